"""The DAG of a run: which jobs the missing cells need, and what each needs and makes.

`plan_jobs` turns a pruned matrix into jobs (qeval.run.jobs) in plan order: an adapter's training
before its arms, a baseline reference before its variants (recorded by the baseline's own
evaluation when it runs, else by a RecordReference job), and artifacts that already exist in the
driver's cache as inputs instead of jobs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qeval.core import env
from qeval.eval.evaluate import EvalSpec
from qeval.run.cells import head_path, is_baseline, reference_path, reference_ready
from qeval.run.jobs import AdapterBundle, EvaluateArm, Job, Origin, RecordReference, TrainAdapter, pack_folder
from qeval.run.plan import RaySettings, Resolved


@dataclass
class Dag:
    """Jobs in plan order (the driver starts each once what it needs exists), and the input
    artifacts that already exist in the driver's cache (key -> a function loading the value)."""

    jobs: list[Job] = field(default_factory=list)
    existing: dict[str, Any] = field(default_factory=dict)

    def producers(self) -> dict[str, str]:
        return {k: j.id for j in self.jobs for k in j.makes}

    def deps(self, job: Job) -> set[str]:
        made = self.producers()
        return {made[k] for k in job.needs if k in made} - {job.id}


def plan_jobs(todo: list[tuple[str, Any, Any, Any, list]], rp: Resolved, pack: bool = False,
              progress=lambda s: None, speed: dict[str, Any] | None = None) -> Dag:
    """The DAG for the missing cells: `todo` holds (tag, model, arm, adapter spec or None, missing
    cells) per (model, arm), in plan order, already pruned of stored cells; `speed` the missing speed
    cells by tag (measured by the arm's evaluation job, after its cells: no load of its own)."""
    speed = speed or {}
    from qeval.train.artifact import artifact_ready, load_artifact
    from qeval.train.spec import adapter_key
    from qeval.eval.divergence import Reference

    origin = Origin.here()
    plan = rp.plan
    eval_spec = EvalSpec(seed=plan.seed, bootstrap_iters=plan.bootstrap_iters)
    gpus = plan_gpus(plan.ray) if rp.device.startswith("cuda") else 0.0
    import torch

    threads = plan.ray.threads_per_job or torch.get_num_threads()
    common = dict(device=rp.device, dtype=str(rp.dtype or "").removeprefix("torch."), origin=origin, num_gpus=gpus, pack=pack, threads=threads)
    dag = Dag()
    made: set[str] = set()
    # the baseline arms that will record references as they evaluate (no extra load)
    for tag, model, arm, spec, cells in todo:
        if is_baseline(arm):
            for c in cells:
                ref = c.key_material.get("divergence", {}).get("reference")
                if ref and not reference_ready(reference_path(c), head_path(c)):
                    made.add(ref)
    for tag, model, arm, spec, cells in todo:
        needs, makes = [], []
        akey = None
        if spec is not None:
            akey = adapter_key(model, spec, rp.device)
            needs.append(akey)
            if akey not in made and akey not in dag.existing:
                meta = env.adapter_dir(akey) / "qeval-artifact.json"
                if artifact_ready(meta.parent):  # a corrupt one is removed (one line) and trained again
                    dag.existing[akey] = _existing_adapter(meta, pack)
                    art = load_artifact(meta, reused=True)
                    progress(f"{tag}: adapter {arm.adapter} reused ({art.trainable_params:,} trainable, "
                             f"{art.train_s:.0f} s)")
                else:
                    dag.jobs.append(TrainAdapter(id=f"train {akey[:12]}", label=tag, model=model, adapter=arm.adapter,
                                                 spec=spec, key=akey, makes=(akey,), **common))
                    made.add(akey)
        for c in cells:
            ref = c.key_material.get("divergence", {}).get("reference")
            if ref is None:
                continue
            path, head = reference_path(c), head_path(c)
            if is_baseline(arm) and ref in made and ref not in dag.existing \
                    and not any(ref in j.makes for j in dag.jobs):
                makes.append(ref)  # this job records it
                continue
            needs.append(ref)
            if ref in made or ref in dag.existing:
                continue
            if reference_ready(path, head):
                dag.existing[ref] = (lambda p=path, h=head: Reference.load(p, h))
            else:
                dag.jobs.append(RecordReference(id=f"reference {ref[:12]}", label=tag, model=model, cell=c,
                                                eval_spec=eval_spec, paths=rp.suite.include_paths, makes=(ref,),
                                                **common))
                made.add(ref)
        if makes:  # the cells that record a reference first: its variants start as soon as it exists
            cells = sorted(cells, key=lambda c: c.key_material.get("divergence", {}).get("reference") not in makes)
        dag.jobs.append(EvaluateArm(id=tag, label=tag, model=model, arm=arm, cells=tuple(cells), seed=plan.seed,
                                    eval_spec=eval_spec, paths=rp.suite.include_paths, adapter_key=akey,
                                    needs=tuple(dict.fromkeys(needs)), makes=tuple(makes), speed=speed.get(tag),
                                    **common))
    return dag


def _existing_adapter(meta: Path, pack: bool):
    from qeval.train.artifact import load_artifact

    def load() -> AdapterBundle:
        art = load_artifact(meta, reused=True)
        return AdapterBundle(art, pack_folder(art.path) if pack else None)

    return load


def plan_gpus(ray: RaySettings) -> float:
    """GPUs one job reserves on CUDA (a model too large for one GPU asks for several): the plan's
    `ray.gpus_per_job`, whichever executor runs the jobs."""
    return float(ray.gpus_per_job)
