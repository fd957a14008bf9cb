"""Resolve a model spec to local weights and load it at a quantization format; memory measurement."""
