"""`qeval diff STORE_A STORE_B`: a store against its copy reports no change (exit 0); a copy with a
planted drop in one cell (a newer record of the same cell, on other library versions, written
through the Store API) reports exactly that cell as worse (exit 1); cells only in one store are
listed; bad input is exit 2. Also `qeval history CELL` on the same store with nightly runs."""
import dataclasses
import math
import shutil

import pytest

from qeval.cli import main
from qeval.store.store import Store

PLANT = "bnb-nf4"  # the arm whose Lee perplexity gets worse in the copy
SHIFT = 1.05  # every document's log-likelihood 5% lower: perplexity rises by exp(0.05 * nats per unit)


@pytest.fixture
def copy(tiny_store, tmp_path):
    path = tmp_path / "copy.sqlite"
    shutil.copy(tiny_store[0], path)
    return path


def records(path):
    with Store(path, readonly=True) as s:
        return list(s.records())


def perplexities(samples, metric):
    """lm-eval's aggregations of rolling log-likelihoods, computed here from (loglikelihood, units)."""
    ll = sum(s[metric][0] for s in samples)
    units = sum(s[metric][1] for s in samples)
    return -ll / units / math.log(2) if metric == "bits_per_byte" else math.exp(-ll / units)


def plant_drop(path):
    """A newer record of the NF4 Lee cell, on another torch, whose every document lost log-likelihood."""
    with Store(path) as s:
        rec = next(r for r in s.records() if r.variant.arm == PLANT and r.task.name == "qeval_lee_ppl")
        samples = s.samples(rec.key)
        for x in samples:
            for metric in rec.metrics:
                x[metric] = [x[metric][0] * SHIFT, x[metric][1]]
        metrics = {k: dataclasses.replace(m, value=perplexities(samples, k)) for k, m in rec.metrics.items()}
        new = dataclasses.replace(rec, key="planted" + rec.key[7:], metrics=metrics, created_at="2099-01-01T00:00:00",
                                  versions={**rec.versions, "torch": "9.9.9"})
        assert s.put(new, samples)
    return rec, metrics


def table(out):
    return [line.split(" | ") for line in out.splitlines() if line.startswith("| ") and "---" not in line][1:]


def test_store_against_its_copy_reports_no_change(tiny_store, copy, capsys, tmp_path):
    out_file = tmp_path / "diff.md"
    assert main(["diff", str(tiny_store[0]), str(copy), "--out", str(out_file)]) == 0
    out = capsys.readouterr().out
    rows = table(out)
    # one row per cell and metric, every one compared (none only in one store), none changed
    assert len(rows) == sum(len(r.metrics) for r in records(tiny_store[0]))
    assert all(r[-1].strip(" |") == "within noise" for r in rows), out
    assert "0 worse, 0 better" in out and "nothing recorded" in out
    assert out_file.read_text() == out


def test_planted_drop_is_reported_worse(tiny_store, copy, capsys):
    rec, planted = plant_drop(copy)
    assert main(["diff", str(tiny_store[0]), str(copy)]) == 1
    out = capsys.readouterr().out
    rows = table(out)
    worse = [r for r in rows if r[-1].startswith("WORSE")]
    cell = f"{rec.variant.model} @ {PLANT} / qeval_lee_ppl"
    assert sorted(r[1] for r in worse) == sorted(rec.metrics) and all(r[0] == "| " + cell for r in worse), out
    for r in worse:  # B's value is the perplexity of the planted documents, computed here
        assert float(r[3]) == pytest.approx(planted[r[1]].value, rel=1e-3)
        assert float(r[3]) > float(r[2])  # perplexity rose
    assert all(r[-1].strip(" |") == "within noise" for r in rows if r not in worse)
    assert f"torch {rec.versions['torch']} -> 9.9.9 (1 cell)" in out  # what differs, matched all the same
    # a margin larger than the change: it no longer counts (exit 0)
    rise = max(planted[m].value / rec.metrics[m].value - 1 for m in rec.metrics if m != "bits_per_byte")
    assert main(["diff", str(tiny_store[0]), str(copy), "--margin", f"loglikelihood_ratio={rise * 2:.4f}"]) == 0
    assert "below min effect" in capsys.readouterr().out


def test_cells_only_in_one_store_are_listed(tiny_store, tmp_path, capsys):
    part = tmp_path / "part.sqlite"
    with Store(tiny_store[0], readonly=True) as src, Store(part) as dst:
        recs = list(src.records())
        kept = [r for r in recs if r.task.name == "qeval_analogy"]
        for r in kept:
            dst.put(r, src.samples(r.key))
    assert main(["diff", str(tiny_store[0]), str(part)]) == 0
    rows = table(capsys.readouterr().out)
    only_a = [r for r in rows if r[-1].strip(" |") == "only in A"]
    assert len(only_a) == len(recs) - len(kept)
    assert len(rows) - len(only_a) == sum(len(r.metrics) for r in kept)


@pytest.mark.parametrize("args, needle", [
    (["--margin", "abc"], "--margin"),
    (["--margin", "acc=-1"], "--margin"),
    (["--fdr", "0"], "--fdr"),
])
def test_bad_options_are_one_line_exit_2(tiny_store, copy, capsys, args, needle):
    with pytest.raises(SystemExit) as e:
        main(["diff", str(tiny_store[0]), str(copy), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def test_missing_or_unrelated_store_is_bad_input(tiny_store, tmp_path, capsys):
    assert main(["diff", str(tiny_store[0]), str(tmp_path / "nope.sqlite")]) == 2
    assert not (tmp_path / "nope.sqlite").exists()
    empty = tmp_path / "empty.sqlite"
    Store(empty).close()
    capsys.readouterr()
    assert main(["diff", str(tiny_store[0]), str(empty)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "share at least one cell" in err[0]


# ----------------------------------------------------------------------------- qeval history

def nightly_runs(path):
    """Three finished nightly runs over the store's cells; the third on the planted record."""
    with Store(path) as s:
        recs = list(s.records())
        planted = next(r for r in recs if r.key.startswith("planted"))
        first = [r.key for r in recs if not r.key.startswith("planted")]
        third = [planted.key if (r.variant.arm, r.task.name) == (PLANT, "qeval_lee_ppl") else r.key
                 for r in recs if not r.key.startswith("planted")]
        for cells, versions in ((first, {"torch": "1"}), (first, {"torch": "1"}), (third, {"torch": "9.9.9"})):
            rid = s.start_run("nightly", {"cells": cells, "versions": versions, "git_sha": "abc"})
            s.finish_run(rid, "ok", {"cells": cells, "versions": versions, "git_sha": "abc", "computed": cells[:1]})
    return planted


def test_history_of_a_cell(copy, capsys):
    rec, _ = plant_drop(copy)
    planted = nightly_runs(copy)
    assert main(["history", f"{PLANT} / qeval_lee_ppl", "--store", str(copy), "--nights", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in out if line.strip()[:1].isdigit()]
    assert [int(r[0]) for r in rows] == [2, 3]  # the last two nights
    primary = rec.primary_metric
    assert [float(r[3]) for r in rows] == pytest.approx(
        [rec.metrics[primary].value, planted.metrics[primary].value], rel=1e-3)
    assert "torch 1 -> 9.9.9" in out[-2] and "*" in out[-2]  # the key changed that night


def test_unknown_cell_is_one_line_with_a_suggestion(copy, capsys):
    plant_drop(copy)
    nightly_runs(copy)
    assert main(["history", f"{PLANT} / qeval_lee_pl", "--store", str(copy)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did you mean" in err[0] and "qeval_lee_ppl" in err[0]


def test_report_history_plot_needs_two_nightly_runs(copy):
    from qeval.report.sections.history import HISTORY_PNG, history_section
    from qeval.stats.compare import history_frame

    plant_drop(copy)
    nightly_runs(copy)
    with Store(copy, readonly=True) as s:
        runs = s.runs("nightly")
        assert history_section(history_frame(runs[:1], s.get)) is None  # one night: no section at all
        section = history_section(history_frame(runs, s.get))
    assert section is not None and section.images[HISTORY_PNG].startswith(b"\x89PNG")
