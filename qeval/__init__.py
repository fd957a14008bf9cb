"""qeval: measure what quantization (and adapters) cost an LLM, on real suites, with durable records."""
import logging

__version__ = "0.1.0"

# torchao 0.18 (imported by peft / transformers whenever it is installed) registers Enum pytree
# constants, which torch 2.13 logs a deprecation line for in every process: noise, not a finding.
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
# ... and torchao logs "Failed to load" for each of its CUDA-only kernel libraries on a CPU machine
logging.getLogger("torchao").setLevel(logging.ERROR)
