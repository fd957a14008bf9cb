"""One cell the usual way, for `qeval bench`'s per-cell comparison: a fresh Python process that
loads (and quantizes) the model with transformers, indexes lm-eval's tasks as its CLI does (built-ins
+ qeval's include path) and runs one task with stock `HFLM`. Prints the primary metric as JSON.

  python scripts/lm_eval_cell.py MODEL_DIR FORMAT TASK LIMIT NUM_FEWSHOT BATCH_SIZE
"""
import json
import sys
import time

t0 = time.perf_counter()
import torch  # noqa: E402
from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

model_dir, fmt, task, limit, shots, bs = sys.argv[1:7]
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from qeval.quant.formats import FORMATS # noqa: E402  (only the format's quantization config: same settings)

fmt_obj = FORMATS.get(fmt)
qcfg = fmt_obj.quantization_config(torch.float32)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, quantization_config=qcfg,
                                             device_map="cpu" if qcfg is not None else None)
if fmt_obj.after_load is not None:
    fmt_obj.after_load(model, "cpu", torch.float32)
tok = AutoTokenizer.from_pretrained(model_dir)
tm = TaskManager(include_path=sys.argv[7] if len(sys.argv) > 7 else None)
res = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=int(bs), device="cpu"), tasks=[task],
                      task_manager=tm, limit=int(limit), num_fewshot=int(shots))
print(json.dumps({"task": task, "format": fmt, "results": {k: v for k, v in res["results"][task].items()
                                                           if isinstance(v, (int, float))},
                  "process_s": time.perf_counter() - t0}))
