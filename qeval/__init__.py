"""qeval: measure what quantization (and adapters) cost an LLM, on real suites, with durable records."""

__version__ = "0.1.0"
