"""A trained adapter on disk (`AdapterArtifact`) and loading it back: the artifact's metadata, and a
fully fine-tuned model as a model."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qeval.train.spec import AdapterSpec

if TYPE_CHECKING:
    from qeval.models.load import LoadedModel, ResolvedModel


@dataclass(frozen=True)
class AdapterArtifact:
    """A trained adapter (or fully fine-tuned model) on disk, with what training it cost."""

    key: str
    path: Path
    spec: AdapterSpec
    trainable_params: int
    total_params: int
    adapter_bytes: int  # bytes of the saved weights (LoRA: the adapter alone)
    train_s: float
    s_per_step: float
    tokens_per_s: float
    peak_train_bytes: int  # training steps only (not the load): CUDA max allocated, or peak RSS on CPU
    idle_bytes: int  # CPU: RSS of that process before loading the base (Python + libraries); 0 on CUDA
    losses: tuple[tuple[int, float], ...]  # (step, training loss)
    heldout: tuple[tuple[int, float], ...]  # (step, held-out loss)
    device: str
    steps_done: int = 0  # fewer than spec.train_steps when early stopping stopped it
    tokens: int = 0  # tokens the optimizer saw (steps_done x batch_size x seq_len, padding included)
    order_hash: str = ""  # sha256 of the token blocks in the order trained: equal means the same tokens
    eval_s: float = 0.0  # held-out passes (not part of train_s, s_per_step, tokens_per_s)
    data: dict = dataclasses.field(default_factory=dict)  # qeval.data.train_data.prepare's summary
    memory: dict = dataclasses.field(default_factory=dict)  # per phase, by part, and the analytic prediction
    reused: bool = False

    def summary(self) -> dict:
        d = dataclasses.asdict(self)
        d["path"] = str(self.path)
        d.pop("reused")
        return d


DIGESTS = "qeval-sha256.json"  # in the artifact's folder: the sha256 of each of its files


def seal_artifact(folder: Path) -> None:
    """Record the hashes of a freshly written artifact folder (before it is renamed into place)."""
    from qeval.core.files import seal_folder

    seal_folder(folder, DIGESTS)


def artifact_ready(folder: Path) -> bool:
    """Whether the cached artifact `folder` is finished and whole: its metadata is there and every
    file hashes as when it was trained. A corrupt one is removed with a WARNING line, so the
    caller trains it again; one trained before hashes were recorded is sealed now."""
    from qeval.core.files import folder_intact

    return (Path(folder) / "qeval-artifact.json").is_file() and folder_intact(folder, DIGESTS, "adapter artifact")


def load_artifact(meta: Path, reused: bool) -> AdapterArtifact:
    """The artifact whose metadata is `meta` (qeval-artifact.json in its folder)."""
    d = json.loads(meta.read_text())
    spec = d.pop("spec")
    if isinstance(spec.get("target_modules"), list):
        spec["target_modules"] = tuple(spec["target_modules"])
    d["losses"] = tuple(tuple(x) for x in d["losses"])
    d["heldout"] = tuple(tuple(x) for x in d["heldout"])
    for name in ("domain_tasks", "seeds"):
        if isinstance(spec.get(name), list):
            spec[name] = tuple(spec[name])
    return AdapterArtifact(**{**d, "path": meta.parent, "spec": AdapterSpec(**spec), "reused": reused})


def load_finetuned(model: ResolvedModel, artifact: AdapterArtifact, fmt_name: str, device: str) -> LoadedModel:
    """A fully fine-tuned model is a folder of float weights: load it like any model."""
    from qeval.core.files import fingerprint
    from qeval.models.load import ResolvedModel, load_model
    from qeval.quant.formats import FORMATS

    ft = ResolvedModel(f"{model.spec}+{artifact.spec.method}", artifact.path, fingerprint(artifact.path), "finetuned")
    loaded = load_model(ft, FORMATS.get(fmt_name), device)
    return dataclasses.replace(loaded, resolved=model)
