"""GGUF parity: qeval's simulated GGUF numerics against llama.cpp's own runtime, per token.

qeval scores every `gguf:` format by simulation: the weights are quantized and dequantized with
GGUF's exact rules, and the model computes in float. llama.cpp computes differently: its CPU kernels
take quantized dot products, quantizing the *activations* too (to Q8_0 / Q8_1 / Q8_K blocks), and
accumulate in their own order. Whether the simulation's numbers are the deployed runtime's is
measured here: for each format a real .gguf file is written (the model's own GGUF file as the
template for metadata and tokenizer; each linear weight re-packed by the same rules the simulation
uses, from the same float baseline; embeddings and norms in F32, as qeval keeps them), scored by
llama.cpp on the divergence task's tokens (the Lee news documents, qeval's token ids fed directly),
and compared position by position with the simulated model's log-probs:

- KL(simulated || runtime), mean over predicted tokens (nats);
- top-1 agreement (the two argmaxes equal);
- perplexity ratio, runtime / simulated, on the documents' own next tokens.

The noise floor is measured, not assumed: the same comparison for an all-F32 file written from the
float baseline (llama.cpp's float path against qeval's float model; the two should agree up to
accumulation order). A format whose KL exceeds FLOOR_FACTOR times that floor departs beyond it; the
row also shows the format's own damage, KL(baseline || simulated), to put the departure in scale.
The model's own file (for the embedded SmolLM2, its Q4_1 GGUF) is compared with the dequantized
baseline qeval evaluates as "none".
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

# model sources whose weights came from a GGUF file, the template every written file copies
GGUF_SOURCES = ("embedded", "gguf")
FLOOR_FACTOR = 10.0  # a departure is KL above 10x the float path's KL (stated, see the docs)
# Hugging Face llama module name -> GGUF tensor name (the llama.cpp tensor categories)
_GGUF_NAME = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


@dataclass
class ParityRow:
    format: str  # "float (F32 file)", "own file (Q4_1)", "gguf:q8_0", ...
    file_types: dict  # ggml type -> tensors in the written file
    tokens: int
    kl_sim_runtime: float
    kl_se: float
    top1: float
    ppl_sim: float
    ppl_runtime: float
    kl_base_sim: float | None = None  # the format's own damage (None for the float row)
    runtime_s: float = 0.0
    flagged: bool = False

    @property
    def ppl_ratio(self) -> float:
        return self.ppl_runtime / self.ppl_sim


@dataclass
class ParityResult:
    model: str
    docs: int
    ctx: int
    floor_kl: float
    threshold: float
    rows: list[ParityRow] = field(default_factory=list)
    runtime: str = ""

    def to_json(self) -> str:
        d = asdict(self)
        for r, row in zip(d["rows"], self.rows):
            r["ppl_ratio"] = row.ppl_ratio
        return json.dumps(d, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "ParityResult":
        d = json.loads(text)
        rows = [ParityRow(**{k: v for k, v in r.items() if k != "ppl_ratio"}) for r in d.pop("rows")]
        return cls(**d, rows=rows)


def compare(lp_sim: np.ndarray, lp_rt: np.ndarray, targets: np.ndarray) -> dict:
    """Per-position log-prob arrays (N, V) of the simulation and the runtime, and the next tokens (N,):
    mean KL(sim || runtime) with its standard error, top-1 agreement, both perplexities."""
    lp_sim, lp_rt = lp_sim.astype(np.float64), lp_rt.astype(np.float64)
    kl = (np.exp(lp_sim) * (lp_sim - lp_rt)).sum(-1)
    idx = np.arange(len(targets))
    return {"tokens": int(len(targets)), "kl_sim_runtime": float(kl.mean()),
            "kl_se": float(kl.std(ddof=1) / np.sqrt(len(kl))) if len(kl) > 1 else 0.0,
            "top1": float((lp_sim.argmax(-1) == lp_rt.argmax(-1)).mean()),
            "ppl_sim": float(np.exp(-lp_sim[idx, targets].mean())),
            "ppl_runtime": float(np.exp(-lp_rt[idx, targets].mean()))}


def mean_kl(lp_p: np.ndarray, lp_q: np.ndarray) -> float:
    lp_p, lp_q = lp_p.astype(np.float64), lp_q.astype(np.float64)
    return float((np.exp(lp_p) * (lp_p - lp_q)).sum(-1).mean())


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def token_windows(tokenizer, n_docs: int, ctx: int) -> list[list[int]]:
    """The divergence task's documents (Lee news), tokenized by qeval's tokenizer, BOS first when the
    tokenizer has one, cut to `ctx` tokens each: the ids both runtimes are fed."""
    from qeval.data.suite_data import ensure_built, suite_data_dir

    ensure_built()
    rows = [json.loads(line) for line in (suite_data_dir() / "lee_news.jsonl").read_text().splitlines()]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return [(bos + tokenizer(r["text"], add_special_tokens=False)["input_ids"])[:ctx] for r in rows[:n_docs]]


def gguf_types(fmt_name: str, model) -> dict[str, str]:
    """GGUF tensor name -> ggml type for each quantized linear of `model` at `fmt_name`, by the same
    rules the simulation applies (legacy types: one type; K mixes: gguf_k's per-tensor rules)."""
    from qeval.quant.backends import gguf_k
    from qeval.quant.formats import FORMATS, quantizable_linears

    fmt = FORMATS.get(fmt_name)
    scheme = fmt_name.split(":")[1]
    if scheme.split(":")[0] in gguf_k.SCHEMES:
        ftype = gguf_k.ALIASES.get(scheme.split(":")[0], scheme.split(":")[0])
        by_module = {n: t[1] for n, t in gguf_k.tensor_types(model, ftype, pure="pure" in scheme).items()}
    else:
        by_module = {n: dict(fmt.options)["type"] for n, _ in quantizable_linears(model)}
    return {_gguf_name(n): t for n, t in by_module.items()}


def _gguf_name(module: str) -> str:
    m = re.search(r"layers\.(\d+)\..*\.(\w+)$", module)
    return f"blk.{m.group(1)}.{_GGUF_NAME[m.group(2)]}.weight"


def write_gguf(template: Path, out: Path, types: dict[str, str]) -> dict:
    """Rewrite `template` (a llama-architecture GGUF) into `out`: its metadata as is, each tensor
    dequantized to float32, then tensors named in `types` re-packed to that ggml type (ggml's own
    quantizer for K/IQ types, gguf.quants for the legacy ones), all others F32. The float values are
    the dequantized template's, i.e. qeval's baseline (GGUF rows are the checkpoint's rows, permuted
    for q/k, and every type quantizes along a row, so the packing equals the simulation's).
    Returns the census {ggml type: tensors}."""
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
    from gguf.quants import dequantize, quantize

    from qeval.quant.backends import ggml_lib

    reader = GGUFReader(str(template))
    arch = reader.get_field("general.architecture").contents()
    writer = GGUFWriter(str(out), arch)
    for f in reader.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        vtype = f.types[0]
        if vtype == GGUFValueType.ARRAY:
            writer.add_array(f.name, f.contents()) if f.types[-1] == GGUFValueType.STRING else \
                writer.add_key_value(f.name, f.contents(), vtype, sub_type=f.types[-1])
        else:
            writer.add_key_value(f.name, f.contents(), vtype)
    census: dict[str, int] = {}
    for t in reader.tensors:
        w = dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32)
        w = w.reshape([int(x) for x in reversed(t.shape)]) if w.ndim > 1 or len(t.shape) > 1 else w.reshape(-1)
        want = types.get(t.name, "F32")
        if want == "F32":
            writer.add_tensor(t.name, np.ascontiguousarray(w))
        else:
            qt = GGMLQuantizationType[want]
            if want in ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0"):
                packed = quantize(np.ascontiguousarray(w), qt)
            elif want == "F16":
                packed = w.astype(np.float16)
            else:
                packed = ggml_lib.quantize(w, want)
            writer.add_tensor(t.name, packed, raw_dtype=qt)
        census[want] = census.get(want, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return census


def file_census(path: Path) -> dict:
    from gguf import GGUFReader

    census: dict[str, int] = {}
    for t in GGUFReader(str(path)).tensors:
        census[t.tensor_type.name] = census.get(t.tensor_type.name, 0) + 1
    return census


def runtime_log_probs(path: Path, windows: list[list[int]], ctx: int) -> tuple[list[np.ndarray], float]:
    """llama.cpp's log-probs for each window (position t predicts token t+1), and the seconds taken."""
    import os

    from qeval.quant.backends.llama_runtime import import_llama_cpp

    llama_cpp = import_llama_cpp()
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, logits_all=True,
                          n_threads=os.cpu_count() or 2, verbose=False, seed=0)
    out = []
    for ids in windows:
        llm.reset()
        llm.eval(ids)
        out.append(log_softmax(np.array(llm.scores[:len(ids) - 1], dtype=np.float32)))
    llm.close() if hasattr(llm, "close") else None
    return out, time.perf_counter() - t0


def sim_log_probs(model, windows: list[list[int]]) -> list[np.ndarray]:
    import torch

    out = []
    with torch.no_grad():
        for ids in windows:
            logits = model(torch.tensor([ids])).logits[0, :-1].double().numpy()
            out.append(log_softmax(logits))
    return out


def run_parity(model_spec: str, formats: list[str], n_docs: int, ctx: int, work_dir: Path,
               log=print) -> ParityResult:
    """The parity table for `model_spec` (a GGUF-sourced model: embedded or a .gguf path) on CPU."""
    from qeval.core.errors import QevalError
    from qeval.models.load import EMBEDDED, load_model, resolve_model
    from qeval.quant.backends import llama_runtime
    from qeval.quant.formats import FORMATS

    resolved = resolve_model(model_spec)
    template = EMBEDDED.get(model_spec)() if resolved.source == "embedded" else Path(model_spec)
    if resolved.source not in GGUF_SOURCES:
        raise QevalError("qeval parity --model", model_spec, "an embedded model or a .gguf file (the template)",
                         "convert the checkpoint to GGUF with llama.cpp's convert_hf_to_gguf.py first")
    work_dir.mkdir(parents=True, exist_ok=True)
    base = load_model(resolved, FORMATS.get("none"), "cpu")
    windows = token_windows(base.tokenizer, n_docs, ctx)
    targets = np.concatenate([np.array(w[1:]) for w in windows])
    lp_base = sim_log_probs(base.model, windows)
    cat = np.concatenate

    def row(name, path, lp_sim, census, kl_base=None):
        lp_rt, secs = runtime_log_probs(path, windows, ctx)
        r = ParityRow(name, census, **compare(cat(lp_sim), cat(lp_rt), targets), kl_base_sim=kl_base,
                      runtime_s=round(secs, 1))
        log(f"parity {name}: KL(sim||runtime) {r.kl_sim_runtime:.3g}, top-1 {r.top1:.4f}, "
            f"ppl ratio {r.ppl_ratio:.4f} ({secs:.0f} s)")
        return r

    f32 = work_dir / "float.gguf"
    census = write_gguf(template, f32, {})
    rows = [row("float (F32 file)", f32, lp_base, census)]
    own = file_census(template)
    main_type = max((k for k in own if k not in ("F32", "F16")), key=lambda k: own[k], default="F32")
    rows.append(row(f"own file ({main_type})", template, lp_base, own))
    for name in formats:
        loaded = load_model(resolved, FORMATS.get(name), "cpu")
        lp = sim_log_probs(loaded.model, windows)
        path = work_dir / (name.replace(":", "_") + ".gguf")
        census = write_gguf(template, path, gguf_types(name, loaded.model))
        rows.append(row(name, path, lp, census, kl_base=mean_kl(cat(lp_base), cat(lp))))
        del loaded
    floor = rows[0].kl_sim_runtime
    threshold = FLOOR_FACTOR * floor
    for r in rows[1:]:
        r.flagged = r.kl_sim_runtime > threshold
    info = llama_runtime.build_info()
    return ParityResult(model_spec, len(windows), ctx, floor, threshold, rows,
                        runtime=info.get("source", "llama-cpp-python"))
