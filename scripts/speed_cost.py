"""CPU time of one speed measurement (qeval.models.speed) per format, one thread: a load-independent cost
(process time counts the work, not spin-waits) for docs/performance.md#speed-per-format-in-a-run.
Usage: PYTHONPATH=. python scripts/speed_cost.py FORMAT..."""
import sys, time, torch
torch.set_num_threads(1)  # process time then measures the work, not spin-waits on a loaded machine
from qeval.models.load import load_model, resolve_model
from qeval.quant.formats import FORMATS
from qeval.models.speed import measure_speed, SpeedSettings
m = resolve_model("smollm2-135m")
for f in sys.argv[1:]:
    lm = load_model(m, FORMATS.get(f), "cpu")
    c0 = time.process_time()
    got = measure_speed(lm, SpeedSettings(prefill_batch=4))
    print(f, "wall %.1f s, cpu %.1f s, prefill %.0f tok/s, decode b1 %.1f b8 %.1f tok/s (1 thread, loaded machine)" % (
        got["seconds"], got["cpu_s"], got["prefill_tok_s"], got["decode"]["1"]["decode_tok_s"], got["decode"]["8"]["decode_tok_s"]), flush=True)
    del lm
