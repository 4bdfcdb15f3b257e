"""Resume checkpoints: where they live, what marks one complete, and the state that is ours.

Layout::

    RUNDIR/checkpoints/step_00001000/
        trainer_state.json          written last, atomically: the checkpoint is complete
        rng_rank00000.safetensors   per rank: torch CPU (and CUDA) generator states, numpy/python in metadata
        -- DeepSpeed backend: DeepSpeed's own files (mp_rank_00_model_states.pt, *_optim_states.pt)
        -- torch backend:     model.safetensors, optimizer.safetensors (+ JSON for its scalars),
                              scheduler.json

``--resume`` takes the highest step that has ``trainer_state.json``, so a save that was cut short
(a kill in the middle of writing) is never picked.  The last ``keep`` complete checkpoints are kept.

Formats: everything we write is JSON or safetensors.  DeepSpeed writes its model and optimizer
states with ``torch.save`` and reads them back with ``torch.load(weights_only=False)`` (that is, a
pickle); they are our own resume state, but only resume from checkpoint directories you trust.
The exported model for finetune/embed (RUNDIR/model) is safetensors + JSON only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from common.atomic import atomic_write_bytes, read_json
from engine.model.export import save_safetensors
from engine.train.distributed import DistContext, broadcast_object
from engine.train.loop import TrainingSetupError

log = logging.getLogger("userbert")

STATE_FILE = "trainer_state.json"
STATE_VERSION = 1
_TAG = re.compile(r"^step_(\d{8,})$")


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """(step, dir) of every complete checkpoint under ``root``, oldest first."""
    root = Path(root)
    out = []
    if root.is_dir():
        for d in root.iterdir():
            m = _TAG.match(d.name)
            if m and (d / STATE_FILE).is_file():
                out.append((int(m.group(1)), d))
    return sorted(out)


def latest_checkpoint(root: str | Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def write_state(ckpt_dir: Path, state: dict[str, Any]) -> None:
    state = {"version": STATE_VERSION, **state}
    atomic_write_bytes(ckpt_dir / STATE_FILE, json.dumps(state, indent=2))


def read_state(ckpt_dir: str | Path) -> dict[str, Any]:
    path = Path(ckpt_dir) / STATE_FILE
    state = read_json(path, ValueError(f"{ckpt_dir}: not a complete checkpoint ({STATE_FILE} missing)"))
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"{path}: version {state.get('version')!r}, expected {STATE_VERSION}")
    return state


def prune(root: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints, and incomplete ones older than the newest
    complete one (left by a save that was killed).  Returns what was removed."""
    root = Path(root)
    complete = complete_checkpoints(root)
    removed = [d for _, d in complete[:-keep]] if keep > 0 else []
    if complete:
        newest = complete[-1][0]
        for d in root.iterdir():
            m = _TAG.match(d.name)
            if m and int(m.group(1)) < newest and not (d / STATE_FILE).is_file():
                removed.append(d)
    for d in removed:
        shutil.rmtree(d, ignore_errors=True)
    return removed


def data_fingerprint(manifest: dict[str, Any], rows: np.ndarray | None) -> str:
    h = hashlib.sha256(json.dumps(manifest.get("shards", manifest), sort_keys=True).encode())
    if rows is not None:
        h.update(np.ascontiguousarray(rows, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def resume_target(run_dir: Path, resume: bool | str | Path, overwrite: bool, ctx: DistContext) -> Path | None:
    """Which checkpoint to resume from (None: a fresh run), decided on rank 0 and shared, so every rank
    agrees even without a shared filesystem view.  Raises TrainingSetupError on every rank."""
    decision: tuple[str, str] = ("fresh", "")
    if ctx.is_main:
        root = checkpoint_root(run_dir)
        existing = complete_checkpoints(root)
        if resume is True or resume == "latest":
            latest = latest_checkpoint(root)
            decision = ("resume", str(latest)) if latest else ("fresh", "")
            if latest is None:
                log.info("--resume: no checkpoint under %s yet; starting at step 0", root)
        elif resume:
            p = Path(resume)
            if not (p / "trainer_state.json").is_file():
                decision = ("error", f"{p}: not a complete checkpoint (no trainer_state.json)")
            else:
                decision = ("resume", str(p))
        elif existing:
            if overwrite:
                import shutil

                shutil.rmtree(root)
                log.warning("--overwrite: removed the checkpoints of an earlier run in %s", root)
            else:
                decision = ("error", f"{run_dir} holds checkpoints of an earlier run (up to step {existing[-1][0]}): "
                                     "pass --resume to continue it, --overwrite to start over, or choose another --out")
    kind, value = broadcast_object(decision, ctx)
    if kind == "error":
        raise TrainingSetupError(value)
    return Path(value) if kind == "resume" else None


# ---------------------------------------------------------------------------------------------- RNG


def rng_file(ckpt_dir: Path, rank: int) -> Path:
    return ckpt_dir / f"rng_rank{rank:05d}.safetensors"


def save_rng(ckpt_dir: Path, rank: int) -> None:
    """This rank's generator states: torch CPU (dropout on CPU), CUDA (dropout on GPU), numpy and
    python (unused by the trainer today; kept so that code which draws from them resumes exactly too)."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    np_state = np.random.get_state()
    py_state = random.getstate()
    meta = {
        "numpy": json.dumps([np_state[0], np_state[1].tolist(), *map(float, np_state[2:])]),
        "python": json.dumps([py_state[0], list(py_state[1]), py_state[2]]),
    }
    save_safetensors(rng_file(ckpt_dir, rank), tensors, metadata=meta)


def load_rng(ckpt_dir: Path, rank: int) -> None:
    path = rng_file(ckpt_dir, rank)
    if not path.is_file():
        raise ValueError(f"{path}: missing: the checkpoint was written by a run with fewer ranks")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        torch.set_rng_state(f.get_tensor("torch_cpu"))
        if "torch_cuda" in f.keys() and torch.cuda.is_available():
            torch.cuda.set_rng_state(f.get_tensor("torch_cuda"))
    if "numpy" in meta:
        name, keys, pos, has_gauss, cached = json.loads(meta["numpy"])
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), cached))
    if "python" in meta:
        version, internal, gauss = json.loads(meta["python"])
        random.setstate((version, tuple(internal), gauss))


# ------------------------------------------------------------------- plain-torch optimizer state


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return list(v)
    if isinstance(v, torch.Tensor):
        return v.item()
    return v


def save_optimizer(ckpt_dir: Path, optimizer: torch.optim.Optimizer) -> None:
    """An optimizer's state_dict as safetensors (its tensors) + JSON (param groups, scalars): no pickle."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for key, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{idx}.{key}"] = v.detach().to("cpu").contiguous()
            else:
                scalars[f"{idx}.{key}"] = _jsonable(v)
    groups = [{k: _jsonable(v) for k, v in g.items()} for g in sd["param_groups"]]
    save_safetensors(ckpt_dir / "optimizer.safetensors", tensors)
    atomic_write_bytes(ckpt_dir / "optimizer.json", json.dumps({"param_groups": groups, "scalars": scalars}))


def load_optimizer(ckpt_dir: Path, optimizer: torch.optim.Optimizer) -> None:
    tensors = load_file(str(ckpt_dir / "optimizer.safetensors"))
    meta = json.loads((ckpt_dir / "optimizer.json").read_text())
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = t
    for name, v in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = v
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_scheduler(ckpt_dir: Path, scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    sd = {k: _jsonable(v) for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    atomic_write_bytes(ckpt_dir / "scheduler.json", json.dumps(sd))


def load_scheduler(ckpt_dir: Path, scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    sd = json.loads((ckpt_dir / "scheduler.json").read_text())
    sd["lr_lambdas"] = [None] * len(getattr(scheduler, "lr_lambdas", []))
    scheduler.load_state_dict(sd)
