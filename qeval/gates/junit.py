"""A nightly run as JUnit XML, the format CI systems (GitHub Actions reporters, GitLab, Jenkins) read.

One testcase per gate (`qeval.gates.nightly.Gate`): classname is the cell as the nightly prints it
('model @ arm / task'), name the metric and the gate ('acc: change' or 'acc: threshold'). A
regression is a `<failure>` carrying the finding line; a gate that could not be evaluated (no
earlier result, a cell that could not run, no baseline) is `<skipped>` with the reason; an
acknowledged regression passes with the finding in `<system-out>` (it does not fail the nightly,
so it must not fail the CI job). One testsuite per gate kind. The elements and attributes are those
the common JUnit schema (Jenkins' junit-10.xsd) requires: testsuites / testsuite (name, tests,
failures, errors, skipped, time, timestamp, hostname) / testcase (name, classname, time).
"""
from __future__ import annotations

import socket
import xml.etree.ElementTree as ET
from datetime import datetime, timezone

from qeval.gates.nightly import Gate, NightlyResult

SUITES = (("change", "changes against the previous run"), ("threshold", "recovery thresholds"),
          ("cell", "cells that could not run"))


def testcase_name(g: Gate) -> str:
    return f"{g.metric}: {g.gate}" if g.metric else "result"


def junit_xml(res: NightlyResult, timestamp: datetime | None = None) -> str:
    """The JUnit XML document of a finished nightly run (every gate, evaluated or not)."""
    stamp = (timestamp or datetime.now(timezone.utc)).strftime("%Y-%m-%dT%H:%M:%S")
    root = ET.Element("testsuites", name=f"qeval {res.kind} run {res.run_id}", time=_secs(res.wall_s))
    totals = dict(tests=0, failures=0, errors=0, skipped=0)
    for gate, title in SUITES:
        gates = [g for g in res.gates if g.gate == gate]
        if not gates and gate == "cell":
            continue
        counts = dict(tests=len(gates), failures=sum(g.status == "failed" for g in gates), errors=0,
                      skipped=sum(g.status == "skipped" for g in gates))
        suite = ET.SubElement(root, "testsuite", name=f"qeval {res.kind}: {title}",
                              **{k: str(v) for k, v in counts.items()},
                              time=_secs(0.0), timestamp=stamp, hostname=socket.gethostname() or "localhost")
        for g in gates:
            case = ET.SubElement(suite, "testcase", name=testcase_name(g), classname=g.cell, time=_secs(0.0))
            if g.status == "failed":
                line = g.finding.line()
                ET.SubElement(case, "failure", message=line, type="regression").text = line
            elif g.status == "skipped":
                ET.SubElement(case, "skipped", message=g.detail)
            else:
                ET.SubElement(case, "system-out").text = g.finding.line() if g.finding else g.detail
        for k, v in counts.items():
            totals[k] += v
        if gate == "change":
            out = [f"{res.method or 'no comparisons'}"] + [f.line() for f in res.findings if f.kind == "warning"]
            ET.SubElement(suite, "system-out").text = "\n".join(out)
        if gate == "cell" and res.failed:
            ET.SubElement(suite, "system-err").text = "\n".join(f"COULD NOT RUN: {line}" for line in res.failed)
    # <testsuites> carries no `skipped` in the schema (junit-10.xsd): the suites count theirs
    root.attrib.update({k: str(v) for k, v in totals.items() if k != "skipped"})
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _secs(s: float) -> str:
    # gates are evaluated together after the run: a per-gate time would be invented, so 0 (the
    # schema requires the attribute); the run's wall time is on <testsuites>
    return f"{s:.3f}"


def error_xml(kind: str, message: str) -> str:
    """The JUnit XML of a nightly that could not finish (exit 3): one testcase with an `<error>`, so a
    CI job that uploads the file shows why instead of an empty or stale report."""
    root = ET.Element("testsuites", name=f"qeval {kind}", tests="1", failures="0", errors="1", time=_secs(0.0))
    suite = ET.SubElement(root, "testsuite", name=f"qeval {kind}", tests="1", failures="0", errors="1", skipped="0",
                          time=_secs(0.0), timestamp=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
                          hostname=socket.gethostname() or "localhost")
    case = ET.SubElement(suite, "testcase", name="run", classname=f"qeval {kind}", time=_secs(0.0))
    ET.SubElement(case, "error", message=message, type="could not finish").text = message
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
