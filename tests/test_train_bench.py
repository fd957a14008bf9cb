"""The training benchmark (qeval.bench.training) on the tiny model: its split adds up and its
efficiency is the ratio it says, checked against the row's own independent timings."""
import pytest

from qeval.bench.training import plan_arms, train_bench, with_settings, write_training
from qeval.core import env


@pytest.fixture(scope="module")
def frame(tiny_model_dir):
    arms = with_settings(plan_arms(env.PACKAGE_ROOT.parent / "plans" / "default.yaml"), seq_len=32, batch_size=2)
    return train_bench(str(tiny_model_dir), arms, "cpu", steps=2, isolate=False)


def test_one_row_per_default_plan_adapter_and_checkpointing_setting(frame):
    assert sorted(zip(frame.adapter, frame.checkpointing)) == [("lora", False), ("lora", True),
                                                               ("qlora", False), ("qlora", True)]
    assert set(frame.train_quant) == {"none", "bnb-nf4-dq"}


def test_split_and_efficiency_are_consistent(frame):
    for r in frame.itertuples():
        parts = r.forward_s + r.backward_s + r.optimizer_s + r.rest_s
        assert parts == pytest.approx(r.step_s)
        assert min(r.forward_s, r.backward_s, r.optimizer_s) > 0 and r.rest_s >= 0
        assert r.train_tok_s == pytest.approx(r.tokens_per_step / r.step_s)
        divisor = 4 if r.checkpointing else 3
        assert r.efficiency == pytest.approx(r.train_tok_s * divisor / r.forward_tok_s)
        # the held-out passes: every eval_every (5) steps, apart from the step and with it
        assert r.heldout_s_per_step == pytest.approx(r.heldout_s / 5)
        assert r.train_tok_s_with_heldout == pytest.approx(r.tokens_per_step / (r.step_s + r.heldout_s / 5))
        held_tokens = r.heldout_efficiency * r.heldout_s * r.forward_tok_s  # whole blocks of seq_len 32
        assert held_tokens >= 32 and held_tokens / 32 == pytest.approx(round(held_tokens / 32))
        assert r.meets_target == (r.efficiency >= 0.75 and r.heldout_efficiency >= 0.75)


def test_table_has_a_row_per_arm(frame, tmp_path):
    text = write_training(frame, tmp_path, "1.00")
    assert text.count("| lora |") == 2 and text.count("| qlora |") == 2 and "Load average" in text
    assert (tmp_path / "training.csv").is_file()


def test_isolated_rows_run_under_the_training_childs_allocator(tiny_model_dir, frame):
    """By default each row is measured in the recipe's own kind of process (a training child whose
    allocator is relaxed after its measured window: the speed most steps of `qeval run` train at),
    not in the bench's."""
    from qeval.models.memory import allocator_description

    arms = with_settings(plan_arms(env.PACKAGE_ROOT.parent / "plans" / "default.yaml"), seq_len=32, batch_size=2)
    row = train_bench(str(tiny_model_dir), {"lora": arms["lora"]}, "cpu", steps=1, settings=(False,))
    assert len(row) == 1 and row.allocator[0] == ("glibc mallopt mmap_threshold 33554432, trim_threshold "
                                                  "67108864 (relaxed after measuring)") or pytest.skip("not glibc")
    assert set(frame.allocator) == {allocator_description()}  # in process: this process's, untouched
