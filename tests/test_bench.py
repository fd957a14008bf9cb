"""The benchmark table: every format measured, targets judged, files written (no timing asserts)."""
from qeval.bench.speed import TARGETS, bench, write


def test_bench_table(tiny_model_dir, tmp_path):
    frame = bench(str(tiny_model_dir), ["none", "bnb-nf4-dq"], "cpu")
    assert list(frame.format) == ["none", "bnb-nf4-dq"]
    assert (frame.prefill_tok_s > 0).all() and (frame.decode_tok_s > 0).all() and (frame.load_s > 0).all()
    assert frame.loc[0, "prefill_vs_none"] == 1.0
    assert frame.loc[1, "bytes"] < frame.loc[0, "bytes"]
    # the judgement follows the stated targets, whatever the timings were
    expect = (frame.ratio_to_theory <= TARGETS["ratio_to_theory"]) & (frame.load_s <= TARGETS["load_s"]) & \
        (frame.prefill_vs_none <= TARGETS["prefill_vs_none"])
    assert list(frame.meets_targets) == list(expect)
    md, csv = write(frame, tmp_path, "meta")
    assert "bnb-nf4-dq" in md.read_text() and csv.read_text().startswith("format,")


def test_bench_gates_without_a_store_says_what_to_run(tmp_path, capsys):
    from qeval.cli import main

    assert main(["bench-gates", "--store", str(tmp_path / "missing.sqlite")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "make report" in err[0]


def test_efficiency_table(tiny_model_dir, tmp_path):
    from qeval.bench.speed import EFFICIENCY_TARGET, efficiency, write_efficiency

    suite = tmp_path / "s.yaml"
    suite.write_text("name: s\ntasks:\n  - {task: qeval_analogy, limit: 6, batch_size: 4}\n"
                     "  - {task: qeval_lee_ppl, limit: 3, batch_size: 2, divergence: true}\n")
    frame, noise = efficiency(str(tiny_model_dir), ["none"], "cpu", suite=str(suite), scale=1.0)
    assert list(frame.task) == ["qeval_analogy", "qeval_lee_ppl"]
    assert (frame.tokens > 0).all() and (frame.qeval_tok_s > 0).all() and (frame.bare_tok_s > 0).all()
    assert list(frame.meets_target) == list(frame.efficiency >= EFFICIENCY_TARGET)
    # the divergence hooks' seconds: a part of the KL task's evaluation, none for a task without KL
    lee, analogy = frame.set_index("task").loc["qeval_lee_ppl"], frame.set_index("task").loc["qeval_analogy"]
    assert 0 < lee.divergence_s < lee.eval_s and analogy.divergence_s == 0
    # noise floor: each log-likelihood task as qeval scores it vs one request per row at batch 1,
    # float rounding only
    assert list(noise.task) == ["qeval_analogy", "qeval_lee_ppl"]
    assert (noise.max_rel_dll < 1e-4).all()
    text = write_efficiency(frame, noise, {"cells": 8, "fresh_process_s": 80.0, "qeval_s": 10.0, "speedup": 8.0},
                            tmp_path)
    assert "Harness efficiency" in text and "8.00x" in text and (tmp_path / "efficiency.csv").is_file()


def test_dtype_floor(tiny_model_dir, tmp_path):
    """bf16 against float32: a positive KL (bf16 rounds the logits), and bf16 against its own
    reference exactly 0 (the reference's logits are recomputed in bf16)."""
    import torch

    from qeval.bench.speed import dtype_floor, write_dtype_floor

    suite = tmp_path / "s.yaml"
    suite.write_text("name: s\ntasks:\n  - {task: qeval_lee_ppl, limit: 3, batch_size: 2}\n")
    row = dtype_floor(str(tiny_model_dir), "cpu", torch.bfloat16, suite=str(suite))
    assert row["dtype"] == "bfloat16" and row["reference_dtype"] == "float32" and row["n"] == 3
    assert row["self_kl_max"] == 0.0 and row["kl_mean"] > 0 and 0 < row["top1_agree"] <= 1
    assert row["kl_p99"] <= row["kl_max"]
    assert "Compute-dtype noise floor" in write_dtype_floor(row)
