"""The closing "Plots" section: the two pictures the accuracy and memory sections drew."""
from __future__ import annotations

from qeval.report.doc import Heading, Image, Section
from qeval.report.sections.base import ReportSection, register
from qeval.report.plots import MEMORY_PNG, RECOVERY_PNG


def figures_section() -> Section:
    return Section([Heading(2, "Plots"),
                    Image("Recovery of each task's primary metric per variant", RECOVERY_PNG),
                    Image("Total memory vs. primary metric per task", MEMORY_PNG)])


register(ReportSection("figures", 100, lambda d: (), lambda f: figures_section()))
