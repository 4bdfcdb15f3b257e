"""Model export: safetensors weights plus a JSON description.  Data, not code.

An exported model directory holds::

    model.safetensors   weights (no pickle anywhere)
    model.json          {"format_version", "model": ModelConfig, "vocab_spec": VocabSpec, "masking": ..., "meta": ...}

Everything needed to rebuild the architecture is in model.json, so fine-tuning and embedding
export never import the training run's code or config files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from common.atomic import atomic_write, atomic_write_bytes, read_json
from common.typed_config import from_dict, to_dict
from engine.config import MaskingConfig, ModelConfig, VocabSpec

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
DESCRIPTION = "model.json"


def save_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
                     ) -> None:
    """``tensors`` as a safetensors file, atomically (common/atomic.py)."""
    blob = save(tensors, metadata=metadata)
    atomic_write(path, lambda f: f.write(blob))


def save_model(out_dir: str | Path, model: torch.nn.Module, model_cfg: ModelConfig, spec: VocabSpec,
               masking: MaskingConfig | None = None, meta: dict[str, Any] | None = None) -> Path:
    out_dir = Path(out_dir)
    # safetensors refuses shared storage; clone so tied or viewed tensors are stored once each.
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    save_safetensors(out_dir / WEIGHTS, state, metadata={"format": "pt"})
    desc = {
        "format_version": FORMAT_VERSION,
        "model": to_dict(model_cfg),
        "vocab_spec": spec.to_dict(),
        "masking": to_dict(masking) if masking is not None else None,
        "meta": meta or {},
    }
    atomic_write_bytes(out_dir / DESCRIPTION, json.dumps(desc, indent=2))
    return out_dir


def load_model_description(model_dir: str | Path) -> tuple[ModelConfig, VocabSpec, dict[str, Any]]:
    model_dir = Path(model_dir)
    path = model_dir / DESCRIPTION
    desc = read_json(path, FileNotFoundError(f"{path}: no exported model here (expected {DESCRIPTION} and {WEIGHTS})"))
    if desc.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {desc.get('format_version')!r}, expected {FORMAT_VERSION}")
    return from_dict(ModelConfig, desc["model"], "model"), VocabSpec.from_dict(desc["vocab_spec"]), desc


def load_weights(model_dir: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    path = Path(model_dir) / WEIGHTS
    if not path.exists():
        raise FileNotFoundError(f"{path}: weights file missing")
    return load_file(str(path), device=str(device))
