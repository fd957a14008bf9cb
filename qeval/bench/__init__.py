"""Benchmarks: speed and memory per format against targets."""
