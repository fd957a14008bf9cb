"""The GPU check's Python part (scripts/gpu-check.sh runs it after the `gpu` tests).

On one CUDA GPU, with nothing fetched: builds a small Llama on the spot (tokenizer trained on the
carried suite data) and a model of Gemma-3-270M's shape (random weights, that tokenizer), then
  1. the training-efficiency table on CUDA (qeval.bench.training) for the default plan's LoRA and
     QLoRA, checkpointing on and off, on the Gemma-shaped model at 8 x 512 tokens a step;
  2. training memory per trainer option on CUDA (scripts/measure_train_memory.py) on that model at
     torchtune's 2 x 2,048: loss variants, checkpointing, activation offloading, 8-bit and paged
     optimizers, a full fine-tune;
  3. a smoke plan: every format that supports CUDA (bf16 baseline and compute) on a small suite
     (choice, perplexity + KL, generation), batch size auto;
  4. a QLoRA training of a few steps (CUDA max-allocated memory from the adapter record) and the
     merge paths (dequantized into the float base, requantized to NF4) as arms of the same plan;
  5. the divergence self-check: the bf16 baseline against its own reference (must be 0), and the
     bf16-vs-float32 baseline KL (the precision's noise floor) beside NF4's KL for scale;
  6. the harness-efficiency table on CUDA (qeval.bench.speed.efficiency) for none + one 4-bit format;
and prints one summary table. `--cpu-dry-run` runs the same on CPU (tiny sizes) to catch crashes.
Exit 0 when every step passed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_llama(folder: Path, texts: list[str], hidden: int, inter: int, layers: int, vocab: int,
                heads: int, kv_heads: int, max_positions: int = 2048, init_range: float = 0.02) -> Path:
    """A Llama with a byte-level BPE tokenizer trained on `texts` (also scripts/gpu_memory_check.py)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=fast.vocab_size, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2, initializer_range=init_range)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def build_model(folder: Path, hidden: int, layers: int, vocab: int) -> Path:
    """The check's model, its tokenizer trained on the carried suite data (no gensim there)."""
    rows = (Path(os.environ["QEVAL_SUITE_DATA"]) / "lee_train.jsonl").read_text().splitlines()
    return build_llama(folder, [json.loads(x)["text"] for x in rows], hidden, hidden * 3, layers, vocab,
                       heads=max(1, hidden // 64), kv_heads=max(1, hidden // 128), init_range=0.1)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu-dry-run", action="store_true", help="run everything on CPU at tiny sizes")
    ap.add_argument("--skip-bnb", action="store_true", help="bitsandbytes is not installed: float formats only")
    args = ap.parse_args()
    os.environ.setdefault("QEVAL_CACHE", tempfile.mkdtemp(prefix="qeval-gpu-check-"))
    import torch

    device = "cpu" if args.cpu_dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --cpu-dry-run to exercise the script on CPU)", file=sys.stderr)
        return 2
    from qeval.quant.formats import FORMATS

    bnb = not args.skip_bnb
    if bnb:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            bnb = False
    # the baseline first: it records the divergence reference the other arms compare with
    formats = ["none"] + [n for n, f in FORMATS.items() if n != "none" and (bnb or f.backend != "bitsandbytes")]
    unavailable = []  # a backend whose package did not travel (see prepare-gpu-wheels.sh) is named, not run
    for n in list(formats):
        try:
            FORMATS.get(n).require(device)
        except Exception as e:
            formats.remove(n)
            unavailable.append(f"{n} ({str(e).split(';')[-1].strip()})")
    if unavailable:
        print("gpu_check: formats left out here: " + ", ".join(unavailable), flush=True)
    if args.cpu_dry_run:  # exercise every code path, not every format: the dry run must stay short
        formats = [f for f in formats if f in ("none", "bnb-nf4-dq")]
    rows: list[tuple[str, str, str]] = []  # (step, result, detail)
    ok = True

    def step(name, fn):
        nonlocal ok
        t0 = time.perf_counter()
        try:
            result, detail = fn()
        except Exception as e:  # a failed step is reported, the others still run
            traceback.print_exc()
            result, detail = "FAIL", f"{type(e).__name__}: {str(e).splitlines()[0][:150] if str(e) else ''}"
        ok &= result != "FAIL"
        rows.append((name, result, f"{detail} ({time.perf_counter() - t0:.0f} s)"))
        print(f"[gpu-check] {name}: {result} {detail}", flush=True)

    work = Path(tempfile.mkdtemp(prefix="qeval-gpu-model-"))
    hidden, layers, vocab = (64, 2, 512) if args.cpu_dry_run else (512, 8, 8192)
    model_dir = build_model(work / "model", hidden, layers, vocab)
    scale = 1 if args.cpu_dry_run else 4
    bs = 4 if args.cpu_dry_run else "auto"
    suite = work / "smoke.yaml"
    suite.write_text("name: gpu-smoke\ntasks:\n"
                     f"  - {{task: qeval_analogy, limit: {10 * scale}, batch_size: {bs}}}\n"
                     f"  - {{task: qeval_lee_ppl, limit: {3 * scale}, batch_size: {bs}, divergence: true}}\n"
                     f"  - {{task: qeval_capitals, limit: {4 * scale}, num_fewshot: 3, batch_size: {bs}}}\n"
                     f"  - {{task: qeval_similarity, limit: {10 * scale}, batch_size: {bs}}}\n")
    from qeval.run.driver import run_plan
    from qeval.run.plan import plan_from
    from qeval.store.store import Store

    adapters, arms = {}, []
    if bnb:
        adapters = {"qlora": {"method": "lora", "train_quant": "bnb-nf4-dq", "r": 8, "alpha": 16, "steps": 4,
                              "batch_size": 2, "seq_len": 64, "eval_every": 2}}
        arms = [{"name": "qlora", "quant": "bnb-nf4-dq", "adapter": "qlora"},
                {"name": "qlora-merged-float", "quant": "bnb-nf4-dq", "adapter": "qlora", "merge": "dequantized"},
                {"name": "qlora-merged-nf4", "quant": "bnb-nf4-dq", "adapter": "qlora", "merge": "requantized"}]
    plan = plan_from(dict(models=(str(model_dir),), formats=tuple(formats), suite=str(suite), device=device,
                          adapters=adapters, arms=tuple(arms), bootstrap_iters=100))
    store_path = work / "store.sqlite"

    # the training steps first: their time is known (~3 minutes), the smoke plan's grows with the formats
    import measure_train_memory as mtm  # scripts/ is on sys.path when a script runs

    shape = "gemma3-tiny" if args.cpu_dry_run else "gemma3-270m"
    gemma = mtm.build(work / shape, shape, str(model_dir))

    def train_eff():
        from qeval.bench.training import plan_arms, train_bench, with_settings

        arms = {k: v for k, v in plan_arms(ROOT / "plans" / "default.yaml").items()
                if bnb or v.train_quant == "none"}
        tokens = dict(batch_size=2, seq_len=64) if args.cpu_dry_run else dict(batch_size=8, seq_len=512)
        frame = train_bench(str(gemma), with_settings(arms, **tokens), device, steps=2 if args.cpu_dry_run else 5,
                            isolate=False)
        print(frame.to_string(index=False))
        frame.to_csv(Path(os.environ.get("OUT") or work, "training-efficiency.csv"), index=False)
        return "ok", "; ".join(f"{r.adapter} ckpt {'on' if r.checkpointing else 'off'}: {r.train_tok_s:,.0f} tok/s, "
                               f"eff {r.efficiency:.2f}" for r in frame.itertuples())

    step("training efficiency on " + device, train_eff)

    def options_memory():
        opts = ["full", "chunked:8", "fused:8", "none", "none+offload", "full+offload", "adamw8bit",
                "paged_adamw8bit", "full-ft", "full-ft+adamw8bit", "full-ft+paged_adamw8bit"]
        if args.cpu_dry_run:  # offloading and paged states need CUDA (refused on CPU)
            opts = [o for o in opts if "offload" not in o and "paged" not in o][:4]
        batch, seq = (1, 64) if args.cpu_dry_run else (2, 2048)
        # its own process: this one holds the earlier steps' tensors, which CUDA max allocated would count
        import subprocess

        run = subprocess.run([sys.executable, str(ROOT / "scripts" / "measure_train_memory.py"), "--tokenizer",
                              str(model_dir), "--shapes", shape, "--work", str(work), "--device", device,
                              "--batch", str(batch), "--seq", str(seq), "--options", ",".join(opts)],
                             stdout=subprocess.PIPE, text=True, check=True)
        rows = [json.loads(x) for x in run.stdout.splitlines() if x.startswith("{")]
        print(run.stdout, flush=True)
        Path(os.environ.get("OUT") or work, "train-memory-options.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows))
        worst = max(rows, key=lambda r: abs(r["err"]))
        return "ok", (f"{len(rows)} options; peak {min(r['peak_MiB'] for r in rows):,.0f}-"
                      f"{max(r['peak_MiB'] for r in rows):,.0f} MiB; largest error {worst['err']:+.1%} ({worst['opt']})")

    step("trainer memory options on " + device, options_memory)

    def smoke():
        s = run_plan(plan, store_path, progress=lambda m: print("   ", m, flush=True))
        if s.failed:
            return "FAIL", "; ".join(s.failed)[:300]
        return "ok", f"{len(s.computed)} cells over {len(formats) + len(arms)} arms ({', '.join(formats)})"

    step("smoke plan, all CUDA formats" + ("" if bnb else " (bitsandbytes absent: float only)"), smoke)

    def records():
        with Store(store_path) as st:
            return list(st.records())

    if bnb:
        def qlora():
            recs = [r for r in records() if r.variant.arm == "qlora"]
            if not recs or not recs[0].adapter:
                return "FAIL", "no qlora record"
            a = recs[0].adapter
            return "ok", (f"{a.spec['steps']} steps, {a.trainable_params} trainable, "
                          f"peak {a.peak_train_bytes / 2**20:.0f} MiB "
                          f"({'CUDA max allocated' if device == 'cuda' else 'RSS'})")

        def merges():
            got = {r.variant.arm for r in records()}
            need = {"qlora-merged-float", "qlora-merged-nf4"}
            return ("ok" if need <= got else "FAIL"), f"arms stored: {sorted(need & got)}"

        step("QLoRA training (few steps)", qlora)
        step("merge paths", merges)
    else:
        rows.append(("QLoRA training / merge paths", "SKIPPED", "bitsandbytes not installed"))

    def self_kl():
        """The baseline against its own reference (must be exactly 0: the reference's logits are
        recomputed in the baseline's dtype on its device), and the noise floor of the compute dtype
        (qeval.bench.speed.dtype_floor: the bf16 baseline against a float32 one), beside NF4's KL from the
        smoke plan for scale."""
        from qeval.bench.speed import dtype_floor
        from qeval.models.load import compute_dtype

        f = dtype_floor(str(model_dir), device, compute_dtype(device), suite=str(suite))
        nf4 = [r.divergence.kl_mean for r in records()
               if r.variant.arm == "bnb-nf4" and r.divergence is not None and r.divergence.measured]
        detail = (f"{f['dtype']} baseline vs itself: KL max {f['self_kl_max']:.2e}; {f['dtype']} vs "
                  f"{f['reference_dtype']} baseline: KL mean {f['kl_mean']:.2e} p99 {f['kl_p99']:.2e}, top-1 "
                  f"{f['top1_agree']:.4f}" + (f"; bnb-nf4 vs baseline: KL mean {nf4[0]:.2e}" if nf4 else ""))
        return ("ok" if f["self_kl_max"] == 0.0 else "FAIL"), detail

    step("divergence self-check (KL floor)", self_kl)

    def eff():
        from qeval.bench.speed import efficiency

        eformats = ["none"] + (["bnb-nf4"] if bnb else [])
        # on a GPU the default suite at full size (the smoke suite's few documents measure mostly
        # fixed costs there); on the CPU dry run the smoke suite
        frame, noise = efficiency(str(model_dir), eformats, device, suite="default" if device == "cuda" else str(suite),
                                  scale=1.0, noise=True)
        print(frame.to_string(index=False))
        print(noise.to_string(index=False))
        frame.to_csv(work / "efficiency.csv", index=False)
        worst = frame.loc[frame.efficiency.idxmin()]
        return "ok", (f"efficiency min {worst.efficiency:.2f} ({worst.task}/{worst.format}), median "
                      f"{frame.efficiency.median():.2f}; qeval tok/s median {frame.qeval_tok_s.median():.0f}")

    step("harness efficiency on " + device, eff)


    print("\n| step | result | detail |\n|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")
    if device == "cuda":
        print(f"\n{torch.cuda.get_device_name(0)}, torch {torch.__version__}, max allocated "
              f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    out = os.environ.get("OUT")
    if out:
        Path(out, "gpu-check.md").write_text("\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
