"""Adapters: what LoRA / QLoRA win back (and forget), what merging costs, the LoRA-vs-QLoRA decision
table, the spread across seeds, training memory measured against its prediction, and the training
curves and memory-vs-score plots."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from qeval.report.doc import Heading, Image, Para, Section, Table
from qeval.report.fmt import MIB, NA, fmt_int, fmt_mib, fmt_num, fmt_pct, fmt_value_stderr, missing
from qeval.report.plots import plt, png
from qeval.report.sections.base import ReportData, ReportSection, register

TRAINING_PNG, TRAIN_MEMORY_PNG = "training_curves.png", "train_memory_vs_score.png"


def adapter_section(frames: dict[str, pd.DataFrame], decision_table: pd.DataFrame, verdict: str,
                    memory: pd.DataFrame) -> Section | None:
    """LoRA / QLoRA: what each adapter arm regained, what merging costs, the decision table."""
    reg, merges, train = frames["regained"], frames["merge"], frames["training"]
    if reg.empty:
        return None
    blocks: list = [Heading(2, "Adapters: what LoRA / QLoRA win back"),
                    Para("lost = baseline - the arm's format without adapter; regained = (arm - that format) / "
                         "lost, oriented so that lower perplexity counts as better. Every verdict is the same paired "
                         "test as the accuracy table (Tango's score test / paired t on log-likelihoods): 'lost' is the "
                         "format against the baseline, 'vs reference' the arm against its format, 'vs baseline' "
                         "the arm against the float baseline. A share regained is shown only where the format's "
                         "loss is significant and meaningful ('worse'); arms trained on the float base have "
                         "nothing to regain and show their gain against the baseline. On an untouched task (not "
                         "the adapter's training domain) the change against the reference measures forgetting.")]
    for task, g in reg.groupby("task", sort=True):
        metric = str(g["metric"].iloc[0])
        blocks.append(Heading(3, f"{task}: {metric}" + (" (untouched by training: forgetting)" if g["untouched"].all() else "")))
        rows = []
        for r in g.sort_values("arm").itertuples(index=False):
            d = r._asdict()
            if r.untouched:
                note = f"forgetting: {fmt_num(r.delta_vs_reference, signed=True)} vs {r.reference_arm}"
            elif d.get("float_base") is True:
                note = f"trained on the float base: {d.get('vs_baseline_verdict', NA)} vs baseline"
            else:
                note = ""
            regained = (fmt_pct(r.regained) if r.lost_significant else
                        f"nothing to regain (loss {d.get('lost_verdict', 'undefined')})")
            rows.append([r.arm, fmt_value_stderr(r.value, r.stderr), r.reference_arm or NA,
                         fmt_num(r.reference_value), fmt_num(r.baseline_value),
                         f"{fmt_num(r.lost, signed=True)} ({d.get('lost_verdict', NA)})", regained,
                         str(d.get("regained_verdict", NA)),
                         f"{fmt_num(r.delta_vs_baseline, signed=True)} ({d.get('vs_baseline_verdict', NA)})", note])
        blocks.append(Table(["arm", metric, "reference", "reference value", "baseline", "lost", "regained",
                             "vs reference", "Δ vs baseline", "note"], rows,
                            [False, True, False, True, True, True, True, False, True, False]))
    if not merges.empty:
        blocks += [Heading(3, "Merge paths"),
                   Para("Each merged arm against the same adapter unmerged on the same 4-bit base: merging into "
                        "the dequantized float base should cost nothing; re-quantizing the merged weights is the "
                        "deploy path that can lose the fine-tune.")]
        rows = [[r.arm, r.task, r.metric, fmt_num(r.unmerged_value), fmt_num(r.merged_value),
                 fmt_num(r.merge_delta, signed=True), fmt_mib(r.merged_bytes)]
                for r in merges.sort_values(["arm", "task"]).itertuples(index=False)]
        blocks.append(Table(["arm", "task", "metric", "unmerged", "merged", "merge Δ", "merged MiB"], rows,
                            [False, False, False, True, True, True, True]))
    images = {}
    if not decision_table.empty:
        score_cols = [c for c in decision_table.columns if ":" in c and c.split(":")[1] not in ("hib", "untouched")]
        header = ["arm", "trained on", "trainable params", "adapter MiB", "tokens", "s/step", "tokens/s", "train s",
                  "peak training MiB", "of which idle process MiB", "converged"] + score_cols
        rows = [[r["arm"], r["train_quant"], f"{int(r['trainable_params']):,}", fmt_mib(r["adapter_bytes"]),
                 fmt_int(r.get("tokens")), fmt_num(r["s_per_step"]), fmt_num(r["tokens_per_s"]), fmt_num(r["train_s"]),
                 fmt_mib(r["peak_train_bytes"]), fmt_mib(r["idle_bytes"]) if r["idle_bytes"] else NA,
                 "no: held-out loss still falling" if r.get("not_converged") else "yes"]
                + [fmt_num(r[c]) for c in score_cols]
                for _, r in decision_table.iterrows()]
        blocks += [Heading(3, "LoRA vs QLoRA: decision table"),
                   Para("Each adapter evaluated on the base it was trained on. Peak training memory is CUDA max "
                        "allocated on GPU; on CPU it is the peak RSS of the training process (each adapter trains "
                        "in a fresh process), of which 'idle' is that process before loading the model "
                        "(Python, torch and the other libraries). Arms compared are trained on the same tokens "
                        "in the same order (checked by a hash of the blocks trained on); s/step and tokens/s "
                        "exclude the held-out evaluation passes. 'converged: no' means the held-out loss fell "
                        "by more than 1% over the last 3 evaluations: the budget was too small to rank the arms "
                        "at convergence."),
                   Table(header, rows, [False, False] + [True] * (len(header) - 3) + [False])]
        if verdict:
            blocks.append(Para("Verdict: " + verdict))
    seeds = frames.get("seeds", pd.DataFrame())
    if not seeds.empty and (seeds["seeds"] > 1).any():
        blocks += [Heading(3, "Training noise: spread across seeds"),
                   Para("Arms trained with several seeds (seeds: [...]): the score's mean with its 95% t interval "
                        "over seeds, min..max, and the regained share's range.")]
        rows = [[r.arm, r.task, r.metric, str(r.seeds), fmt_num(r.value_mean),
                 f"[{fmt_num(r.value_lo)}, {fmt_num(r.value_hi)}]", f"{fmt_num(r.value_min)} .. {fmt_num(r.value_max)}",
                 f"{fmt_pct(r.regained_min)} .. {fmt_pct(r.regained_max)}" if not missing(r.regained_mean) else NA]
                for r in seeds[seeds["seeds"] > 1].itertuples(index=False)]
        blocks.append(Table(["arm", "task", "metric", "seeds", "mean", "95% interval", "min .. max", "regained"],
                            rows, [False, False, False, True, True, True, True, True]))
    if not train.empty and "memory" in train and train["memory"].map(bool).any():
        blocks += _train_memory_blocks(train)
    if not train.empty:
        images[TRAINING_PNG] = _training_png(train)
        blocks.append(Image("Training and held-out loss per adapter", TRAINING_PNG))
    images[TRAIN_MEMORY_PNG] = _train_memory_png(reg, train, memory)
    blocks.append(Image("Peak training memory vs score per arm", TRAIN_MEMORY_PNG))
    files = {"adapters.csv": reg.to_csv(index=False).encode("utf-8"),
             "training.csv": train.drop(columns=["losses", "heldout", "memory"], errors="ignore").to_csv(index=False).encode("utf-8")}
    if not seeds.empty:
        files["adapter_seeds.csv"] = seeds.to_csv(index=False).encode("utf-8")
    return Section(blocks, images, files)


def _train_memory_blocks(train: pd.DataFrame) -> list:
    """Training memory by part against the analytic model (qeval.train.estimate), and the
    projection of the measured model to common GPU sizes (`qeval plan-memory`)."""
    import json

    from qeval.train.estimate import Shape, fits_table

    rows = []
    for t in train.itertuples(index=False):
        m = t.memory or {}
        if not m:
            continue
        pred = m.get("predicted") or {}
        err = m.get("prediction_error")
        rows.append([str(t.adapter), str(t.train_quant), fmt_mib(m.get("load_peak")), fmt_mib(m.get("train_peak")),
                     fmt_mib(m.get("runtime")) if m.get("runtime") else NA,
                     fmt_mib(m.get("process")) if m.get("process") else NA,
                     fmt_mib(m.get("weights")), fmt_mib(m.get("adapter_optimizer")), fmt_mib(m.get("gradients")),
                     fmt_mib(m.get("activations")), fmt_mib(pred.get("activations")),
                     fmt_mib(pred.get("total")), NA if err is None else f"{err:+.1%}",
                     str(m.get("options") or NA)])  # the trainer's memory choices the prediction assumed
    out = [Heading(3, "Training memory by part, measured and predicted"),
           Para("Each adapter trains in a fresh process; load and training are measured apart (a 4-bit load on "
                "CPU reads the float weights to quantize them: that high-water mark is not training memory). On CPU "
                "the peak is the process's peak RSS (Linux VmHWM, reset per phase); the training process unmaps every freed block of 1 MiB or more (glibc "
                "mallopt), so RSS follows what is live, and a quantized base keeps no view of the weights file. On "
                "CUDA max allocated is reset per phase. runtime = RSS after importing the training libraries, "
                "before the load; process = what the load left besides the model (tokenizer, data); weights = the "
                "loaded model; adapter + optimizer = trainable weights + AdamW states; activations = the rest of "
                "the training peak (held-out passes included). Predicted: qeval.train.estimate from the model's "
                "config plus the measured runtime and process (error = predicted / measured - 1); trainer options: "
                "the trainer's memory choices the adapter trained with and the prediction counts "
                "(qeval.train.estimate.Options)."),
           Table(["adapter", "trained on", "load peak MiB", "training peak MiB", "runtime", "process", "weights",
                  "adapter + optimizer", "gradients", "activations", "predicted activations", "predicted MiB", "error",
                  "trainer options"],
                 rows, [False, False] + [True] * 11 + [False])]
    t = train.iloc[0]
    cfg = Path(str(t.get("model_path", ""))) / "config.json"
    if cfg.is_file():
        shape = Shape.from_config(json.loads(cfg.read_text()))
        batch, seq = int(t.get("batch_size") or 1), int(t.get("seq_len") or 512)
        proj = []
        for gpu in (16, 24, 48, 80):
            for r in fits_table(shape, gpu, batch, seq):
                proj.append([f"{gpu} GiB", r["method"], fmt_num(r["weights_gib"]), fmt_num(r["total_gib"]),
                             "yes" if r["fits"] else "no"])
        out += [Heading(3, "Projected to GPUs (bf16, this model)"),
                Para(f"`qeval plan-memory --config {cfg.parent} --batch-size {batch} --seq-len {seq}`: predicted peak "
                     "GiB of LoRA, QLoRA (NF4 + double quant) and a full fine-tune (fp32 master weights) per GPU size."),
                Table(["GPU", "method", "weights GiB", "total GiB", "fits"], proj, [False, False, True, True, False])]
    return out


def _training_png(train: pd.DataFrame) -> bytes:
    fig, ax = plt.subplots(figsize=(7.5, 4))
    for i, t in enumerate(train.itertuples(index=False)):
        color = plt.get_cmap("tab10")(i % 10)
        steps, loss = zip(*t.losses) if len(t.losses) else ((), ())
        ax.plot(steps, loss, color=color, alpha=0.45, lw=1, label=f"{t.adapter} ({t.train_quant}) train")
        hs, hl = zip(*t.heldout) if len(t.heldout) else ((), ())
        late = " (not converged)" if getattr(t, "not_converged", False) else ""
        ax.plot(hs, hl, color=color, marker="o", lw=2, label=f"{t.adapter} held-out{late}")
    ax.set_xlabel("step (the same tokens per step for every arm)")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_title("Training loss (thin) and held-out loss (markers)", fontsize=10)
    return png(fig)


def _train_memory_png(reg: pd.DataFrame, train: pd.DataFrame, memory: pd.DataFrame) -> bytes:
    """x = peak training memory of the arm's adapter (0 for arms with no training), y = score on
    each task; one panel per task."""
    peak = {t.adapter: float(t.peak_train_bytes) / MIB for t in train.itertuples(index=False)}
    tasks = sorted(reg["task"].unique())
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.8 * len(tasks), 3.9), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        g = reg[reg.task == task]
        metric = str(g["metric"].iloc[0])
        for k, r in enumerate(g.sort_values("arm").itertuples(index=False)):
            base_adapter = str(r.adapter).split("@")[0]
            x = peak.get(base_adapter, math.nan)
            ax.errorbar([x], [r.value], yerr=None if missing(r.stderr) else r.stderr, fmt="o", capsize=3)
            ax.annotate(r.arm, (x, r.value), textcoords="offset points", xytext=(6, 6 if k % 2 == 0 else -11), fontsize=8)
        refs = g.drop_duplicates("reference_arm")
        for r in refs.itertuples(index=False):
            if not missing(r.reference_value):
                ax.axhline(r.reference_value, ls=":", lw=1, color="grey")
                ax.annotate(f"{r.reference_arm} (no training)", (0.01, r.reference_value), xycoords=("axes fraction", "data"),
                            fontsize=7, color="grey", va="bottom")
        if not g.empty and not missing(g["baseline_value"].iloc[0]):
            ax.axhline(g["baseline_value"].iloc[0], ls="--", lw=1, color="black")
            ax.annotate("baseline (no training)", (0.01, g["baseline_value"].iloc[0]), xycoords=("axes fraction", "data"),
                        fontsize=7, va="bottom")
        ax.set_title(task, fontsize=10)
        ax.set_xlabel("peak training memory (MiB)")
        ax.set_ylabel(f"{metric} ({'higher' if bool(g['higher_is_better'].iloc[0]) else 'lower'} is better)")
        ax.grid(alpha=0.3)
        ax.margins(x=0.25, y=0.2)
    fig.suptitle("Peak training memory vs score per arm (lines: arms without training)", fontsize=11)
    fig.tight_layout()
    return png(fig)



def _frame(d: ReportData) -> tuple | None:
    return None if d.adapters is None else (d.adapters, d.decision, d.verdict, d.memory)


register(ReportSection("adapters", 80, _frame, lambda f: adapter_section(*f)))
