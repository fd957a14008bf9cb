"""`qeval --help`, `qeval report --help`, `qeval suites` and `qeval formats` answer at once: neither
torch nor transformers is imported (seconds each) on the way. Checked with `python -X importtime` in
a fresh interpreter, which lists every module the command imported."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit
_HEAVY = re.compile(r"\|\s+(torch|transformers)$", re.MULTILINE)


def heavy_imports(*args: str) -> list[str]:
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "qeval", *args], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return _HEAVY.findall(proc.stderr)


@pytest.mark.parametrize("args", [["--help"], ["report", "--help"], ["suites"]], ids=" ".join)
def test_light_commands_import_neither_torch_nor_transformers(args):
    assert heavy_imports(*args) == []


def test_qeval_formats_imports_neither_torch_nor_transformers():
    assert heavy_imports("formats") == []


def test_rendering_a_report_imports_neither_torch_nor_transformers(tmp_path):
    # a store of records written by main at 491cb25 (tests/data): the report is built from records alone
    import json
    from pathlib import Path

    from qeval.store.record import Record
    from qeval.store.store import Store

    store = tmp_path / "store.sqlite"
    with Store(store) as s:
        for line in (Path(__file__).parent / "data" / "records_v_main.jsonl").read_text().splitlines():
            s.put(Record.from_json(json.loads(line)))
    assert heavy_imports("report", "--store", str(store), "--out", str(tmp_path / "out")) == []
    assert (tmp_path / "out" / "report.md").is_file()
