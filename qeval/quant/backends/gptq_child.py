"""The GPTQ quantization job, run by the isolated venv's Python (never imported by qeval's own env).

    <venv>/bin/python gptq_child.py job.json

job.json (written by `qeval.quant.backends.gptq`): the float model folder, the calibration token ids,
the GPTQ (or, with `method: awq`, AWQ) options and the output folder. This script imports only the standard library, torch and
gptqmodel (which brings its own transformers), so it runs in an environment that has none of qeval's
dependencies. It writes gptqmodel's checkpoint (packed qweight/qzeros/scales/g_idx safetensors +
quantize_config.json) into `out` and a `qeval-gptq-child.json` with the versions and the time the
quantization took.
"""
import json
import os
import sys
import time

# Python puts this script's folder first on sys.path, and that folder holds qeval's backend modules
# hqq.py, gguf.py, torchao.py, awq.py: transformers' `import hqq` / `import torchao` (availability
# checks) found them instead of the packages and the child died importing qeval. The child imports
# nothing from its own folder.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]


def _exit_with_parent() -> None:
    """A qeval run killed with -9 cannot stop this child: without this it would quantize on for
    minutes (and write into the cache's work folder) after its run was gone."""
    import threading

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def main(job_path: str) -> int:
    _exit_with_parent()
    with open(job_path) as f:
        job = json.load(f)
    threads = int(job.get("threads") or 0)
    if threads > 0:
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(threads))
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    import gptqmodel
    from gptqmodel import GPTQModel, QuantizeConfig

    with open(job["calibration"]) as f:
        blocks = json.load(f)
    calibration = [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in blocks]
    if job.get("method") == "awq":  # gptqmodel's AWQ, written as an AWQ GEMM checkpoint
        from gptqmodel.quantization import FORMAT, METHOD

        qcfg = QuantizeConfig(bits=job["bits"], group_size=job["group_size"], quant_method=METHOD.AWQ,
                              format=FORMAT.GEMM)
    else:
        qcfg = QuantizeConfig(bits=job["bits"], group_size=job["group_size"], desc_act=job["desc_act"],
                              sym=job["sym"], damp_percent=job["damp_percent"])
    t0 = time.perf_counter()
    model = GPTQModel.load(job["model_dir"], qcfg, device="cpu")
    t_load = time.perf_counter() - t0
    kw = {}
    if job.get("method") == "awq":
        from gptqmodel.utils.backend import BACKEND

        # gptqmodel packs AWQ GEMM with its CUDA kernel unless told otherwise ("AWQ: CUDA is not
        # available" on CPU); its portable torch kernel writes the same GEMM layout
        kw["backend"] = BACKEND.AWQ_TORCH
    model.quantize(calibration, batch_size=1, **kw)
    t_quant = time.perf_counter() - t0 - t_load
    model.save(job["out"])
    import importlib.metadata as md

    versions = {p: md.version(p) for p in ("gptqmodel", "torch", "transformers")}
    info = {"versions": versions, "load_s": t_load, "quantize_s": t_quant, "total_s": time.perf_counter() - t0,
            "samples": len(blocks), "seq_len": len(blocks[0]) if blocks else 0,
            "gptqmodel_file": gptqmodel.__file__}
    with open(os.path.join(job["out"], "qeval-gptq-child.json"), "w") as f:
        json.dump(info, f, indent=1, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
