"""Regression gates: the nightly, and the simulation of its false-alarm and detection rates."""
