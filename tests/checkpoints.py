"""Build official-layout checkpoints with the fixtures' deterministic weights (``detweights.value``).

The files are written exactly as users download them: detector = mmengine-style dict with
``state_dict`` and ``meta``; Uni = flat dict of tensors.
"""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import numpy as np
import torch

from paths import FIXTURES

sys.path.insert(0, str(FIXTURES))
import detweights  # noqa: E402  (the fixtures' weight generator)


@functools.lru_cache(maxsize=4)
def _value(key: str, shape: tuple[int, ...]) -> np.ndarray:
    # The 250002-row word embedding takes ~15 s; tiny and base share it.
    return detweights.value(key, shape)


def official_state_dict(keys_file: Path) -> dict[str, torch.Tensor]:
    """Every key of a ``keys_*.json`` filled with its deterministic value (integers: zero)."""
    spec = json.loads(Path(keys_file).read_text())
    sd = {}
    for key, info in spec.items():
        shape = tuple(info["shape"])
        if info["dtype"].startswith("int"):
            sd[key] = torch.zeros(shape, dtype=getattr(torch, info["dtype"]))
        else:
            sd[key] = torch.from_numpy(_value(key, shape).copy())
    return sd


def write_official(keys_file: Path, path: Path) -> Path:
    """Write the checkpoint of ``keys_file`` in the official file format for its kind."""
    sd = official_state_dict(keys_file)
    if "embeddings" in sd and not any(k.startswith("backbone.text_model") for k in sd):
        torch.save(sd, path)  # WeDetect-Uni: flat dict
    else:
        torch.save({"state_dict": sd, "meta": {"epoch": 12, "mmengine_version": "0.10.7"}}, path)
    return path
