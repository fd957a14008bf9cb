"""The command line: bad input is one line + exit 2 with the store untouched; run + report work."""
import subprocess
import sys

import pandas as pd
import pytest

from qeval.cli import main


def _err(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    return [line for line in err if line.startswith("qeval: error:")], err


@pytest.mark.parametrize("args,expect", [
    (["--formats", "none,bnb-nf5"], ["'bnb-nf5'", "did you mean 'bnb-nf4'"]),
    (["--suite", "defualt"], ["'defualt'", "did you mean 'default'"]),
    (["--model", "/no/such/model"], ["'/no/such/model'", "existing folder"]),
    (["--model", "someorg/some-model"], ["'someorg/some-model'", "offline"]),
    (["--tasks", "hellaswag"], ["'hellaswag'", "network"]),
    (["--tasks", "qeval_analogi"], ["did you mean 'qeval_analogy'"]),
    (["--device", "cuda"] if not __import__("torch").cuda.is_available() else ["--formats", "x"], ["expected"]),
    (["--limit", "5"], ["--limit", "--tasks"]),
])
def test_bad_input_is_one_line_and_exit_2(args, expect, capsys, tmp_path, tiny_model_dir):
    store = tmp_path / "store.sqlite"
    model = [] if "--model" in args else ["--model", str(tiny_model_dir)]
    assert main(["run", *model, *args, "--store", str(store)]) == 2
    errors, err = _err(capsys)
    assert len(errors) == 1 and len(err) == 1, err  # no traceback, no chatter
    for e in expect:
        assert e in errors[0]
    assert not store.exists()  # the store is untouched


def test_malformed_suite_yaml(capsys, tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntasks:\n  - task: qeval_analogy\n    limit: [1\n")
    assert main(["run", "--model", str(tiny_model_dir), "--suite", str(bad), "--store", str(tmp_path / "s")]) == 2
    errors, _ = _err(capsys)
    assert "malformed suite YAML" in errors[0] and "line" in errors[0]


def test_config_errors_reported_together(capsys, tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text("models: [smollm2-135m]\nformat: [none]\nseed: abc\n")
    assert main(["run", "--plan", str(plan), "--store", str(tmp_path / "s")]) == 2
    errors, _ = _err(capsys)
    assert len(errors) == 2
    assert "unknown key" in errors[0] and "did you mean 'formats'" in errors[0]
    assert "seed" in errors[1] and "int" in errors[1]


def test_run_then_report(capsys, tmp_path, tiny_model_dir):
    suite = tmp_path / "s.yaml"
    suite.write_text("name: s\ntasks:\n  - {task: qeval_analogy, limit: 6, batch_size: 6}\n  - {task: qeval_lee_ppl, limit: 2}\n")
    store, out = tmp_path / "store.sqlite", tmp_path / "report"
    args = ["run", "--model", str(tiny_model_dir), "--formats", "none,bnb-nf4-dq", "--suite", str(suite),
            "--store", str(store), "--device", "cpu"]
    assert main(args) == 0
    assert "4 computed, 0 reused" in capsys.readouterr().err
    assert main(args) == 0
    assert "0 computed, 4 reused" in capsys.readouterr().err
    assert main(["report", "--store", str(store), "--out", str(out)]) == 0
    frame = pd.read_csv(out / "results.csv")
    required = ["model", "quant", "adapter", "task", "metric", "value", "stderr", "n", "baseline_value",
                "delta", "recovery", "weight_bytes"]
    assert set(required) <= set(frame.columns)
    nf4 = frame[(frame.quant == "bnb-nf4-dq") & (frame.metric == "acc")].iloc[0]
    base = frame[(frame.quant == "none") & (frame.metric == "acc")].iloc[0]
    assert nf4.baseline_value == base.value
    if base.value:
        assert nf4.recovery == pytest.approx(nf4.value / base.value)
    assert (out / "report.md").read_text().count("bnb-nf4-dq") >= 2
    assert (out / "report.html").is_file()


def test_report_without_store(capsys, tmp_path):
    assert main(["report", "--store", str(tmp_path / "none.sqlite"), "--out", str(tmp_path / "r")]) == 2
    assert "qeval run" in _err(capsys)[0][0]


def test_listing_commands(capsys):
    assert main(["formats"]) == 0
    out = capsys.readouterr().out
    for name in ("none", "bnb-int8", "bnb-nf4", "bnb-nf4-dq", "bnb-fp4", "bnb-fp4-dq", "4.127"):
        assert name in out
    assert main(["suites"]) == 0
    out = capsys.readouterr().out
    assert "default" in out and "qeval_analogy" in out and "qeval_lee_ppl" in out


def test_module_entry_point_help():
    res = subprocess.run([sys.executable, "-m", "qeval", "run", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0
    assert "--formats" in res.stdout and "--suite" in res.stdout and "examples:" in res.stdout


def test_help_and_version_do_not_import_torch():
    import subprocess
    import sys

    code = ("import sys; from qeval.cli import main\n"
            "try: main(['--help'])\nexcept SystemExit: pass\n"
            "try: main(['--version'])\nexcept SystemExit: pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "qeval 0.1.0" in r.stdout


def test_verbose_after_the_subcommand(capsys):
    from qeval.cli import main

    assert main(["formats", "-v"]) == 0
    assert main(["-v", "formats"]) == 0


def test_unexpected_exception_is_one_line_and_exit_3(monkeypatch, capsys):
    import dataclasses

    from qeval import cli

    def boom(args):
        raise ZeroDivisionError("division by zero")

    formats = cli.COMMANDS.get("formats")
    monkeypatch.setitem(cli.COMMANDS._items, "formats", dataclasses.replace(formats, run=boom))
    monkeypatch.delenv("QEVAL_DEBUG", raising=False)
    assert cli.main(["formats"]) == 3
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "qeval: could not finish: internal error: ZeroDivisionError: division by zero; rerun with -v/QEVAL_DEBUG=1 for the traceback"]
    assert cli.main(["formats", "-v"]) == 3
    assert "Traceback" in capsys.readouterr().err


def test_every_command_renders_its_help(capsys):
    """argparse %-formats help strings: a bare '%' in one command's help broke `qeval --help` for all."""
    from qeval.cli import main
    from qeval.cli.base import ORDER

    for name in ["", *ORDER]:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"] if name else ["--help"])
        assert e.value.code == 0, name
        assert "usage: qeval" in capsys.readouterr().out
