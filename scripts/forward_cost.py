"""CPU time of one forward per format, one thread: what a format costs relative to float, robust to
other load on the machine (process time, not wall time). Not a benchmark target (see `make bench`).

    PYTHONPATH=. .venv/bin/python scripts/forward_cost.py none bnb-nf4 torchao:int8-wo gguf:q8_0
"""
import sys
import time

import torch

from qeval.models.load import load_model, resolve_model
from qeval.quant.formats import FORMATS


def main(names: list[str], model: str = "smollm2-135m") -> None:
    torch.set_num_threads(1)
    resolved = resolve_model(model)
    ids = torch.randint(100, 10_000, (4, 128), generator=torch.Generator().manual_seed(0))
    for name in names:
        t0 = time.process_time()
        lm = load_model(resolved, FORMATS.get(name).require("cpu"), "cpu")
        load = time.process_time() - t0
        with torch.no_grad():
            lm.model(ids)  # warm-up
            times = []
            for _ in range(3):
                t0 = time.process_time()
                lm.model(ids)
                times.append(time.process_time() - t0)
        print(f"{name:24s} load+quantize {load:5.1f} s CPU   forward 4x128 {min(times):5.2f} s CPU", flush=True)
        del lm


if __name__ == "__main__":
    main(sys.argv[1:] or ["none"])
