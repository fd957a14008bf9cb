"""One helper for the end-to-end format tests: run formats on a model with the Lee KL task (2
documents), render the report, and hand back the stored records (by format), report.md and the report folder."""
from __future__ import annotations

from pathlib import Path


def run_kl_and_report(model_dir: Path, formats: str, tmp_path: Path, capsys) -> tuple[dict, str, Path]:
    from qeval.cli import main
    from qeval.store.store import Store

    suite = tmp_path / "s.yaml"
    suite.write_text("name: s\ntasks:\n  - {task: qeval_lee_ppl, limit: 2, batch_size: 1, divergence: true}\n")
    store, out = tmp_path / "store.sqlite", tmp_path / "rep"
    assert main(["run", "--model", str(model_dir), "--formats", formats, "--suite", str(suite),
                 "--store", str(store)]) == 0
    assert main(["report", "--store", str(store), "--out", str(out)]) == 0
    capsys.readouterr()
    with Store(store, readonly=True) as st:
        records = {r.variant.quant: r for r in st.records()}
    return records, (out / "report.md").read_text(), out
