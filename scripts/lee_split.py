"""Where the Lee perplexity + KL cell's time goes (issue 24), on the embedded model, CPU float32.

Runs the default suite's `qeval_lee_ppl` for the baseline (recording its divergence reference) and
for one variant (with and without the KL against that reference), records every forward, then
replays the recorded batches bare: the model body alone, and body + full head + log-softmax. Prints
seconds per part; the divergence hooks' own seconds come from `EvalOutcome.divergence_s`.

    PYTHONPATH=$PWD .venv/bin/python scripts/lee_split.py [VARIANT_FORMAT]   # default torchao:int8-wo
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    import torch

    from qeval.eval.evaluate import EvalSpec, evaluate
    from qeval.eval.lm import split_model
    from qeval.eval.suites import load_suite
    from qeval.models.load import load_model, resolve_model
    from qeval.quant.formats import FORMATS

    variant = sys.argv[1] if len(sys.argv) > 1 else "torchao:int8-wo"
    task = next(t for t in load_suite("default").tasks if t.task == "qeval_lee_ppl")
    resolved, spec = resolve_model("smollm2-135m"), EvalSpec()
    base = load_model(resolved, FORMATS.get("none"), "cpu")
    rec: list = []
    out = evaluate(base, task, spec, divergence="reference", recorder=rec)
    forwards = [x for x in rec if x[0] == "forward"]
    tokens, padded = sum(sum(x[2]) for x in forwards), sum(x[1].numel() for x in forwards)
    print(f"baseline recording its reference: {out.eval_s:.1f} s (hooks {out.divergence_s:.1f} s); "
          f"{len(forwards)} forwards, {tokens} tokens ({padded} positions with padding)")
    body, head, _ = split_model(base.model)
    with torch.no_grad():
        t0 = time.perf_counter()
        for x in forwards:
            body(input_ids=x[1], use_cache=False)
        t1 = time.perf_counter()
        for x in forwards:
            torch.log_softmax(head(body(input_ids=x[1], use_cache=False).last_hidden_state), -1)
        t2 = time.perf_counter()
    print(f"bare float: body {t1 - t0:.1f} s, body + head + log-softmax {t2 - t1:.1f} s")
    lm = load_model(resolved, FORMATS.get(variant), "cpu")
    evaluate(lm, task, spec, divergence=out.reference)  # warm-up: first-call kernel choices
    with_kl = evaluate(lm, task, spec, divergence=out.reference)
    without = evaluate(lm, task, spec)
    print(f"{variant}: with KL {with_kl.eval_s:.1f} s (hooks {with_kl.divergence_s:.1f} s), "
          f"without {without.eval_s:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
