"""Tiny WeDetect-Ref checkpoints built from a fixture folder (config, tokenizer, processor files) plus
deterministic weights (``detweights.value`` for every key of its ``keys_*.json``)."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from paths import FIXTURES

sys.path.insert(0, str(FIXTURES))
import detweights  # noqa: E402

TINY_REF = FIXTURES / "ref_tiny"


def key_list(folder: Path) -> dict[str, dict]:
    """The checkpoint's key -> {shape, dtype} listing (exactly one ``keys_*.json`` per folder)."""
    [path] = folder.glob("keys_*.json")
    return json.loads(path.read_text())


def build_checkpoint(fixture_dir: Path, out: Path) -> Path:
    """Turn a fixture folder into a loadable WeDetect-Ref folder: its non-case files + model.safetensors."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    for p in fixture_dir.iterdir():
        if p.is_file() and not p.name.startswith(("case_", "keys_", "README")):
            shutil.copy(p, out / p.name)
    tensors = {k: torch.from_numpy(detweights.value(k, v["shape"])) for k, v in key_list(fixture_dir).items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="session")
def ref_checkpoint(tmp_path_factory):
    """``ref_checkpoint(fixture_dir) -> Path``: build (once per session) the checkpoint of a fixture folder."""
    cache: dict[Path, Path] = {}

    def build(fixture_dir: Path) -> Path:
        if fixture_dir not in cache:
            cache[fixture_dir] = build_checkpoint(fixture_dir, tmp_path_factory.mktemp(fixture_dir.name))
        return cache[fixture_dir]

    return build


@pytest.fixture(scope="session")
def tiny_ref_dir(ref_checkpoint) -> Path:
    return ref_checkpoint(TINY_REF)


@pytest.fixture(scope="session")
def tiny_model_and_processor(tiny_ref_dir):
    """The tiny checkpoint loaded once; tests wrap it in their own WeDetectRef."""
    from wedetect.ref import WeDetectRef

    ref = WeDetectRef.from_pretrained(tiny_ref_dir)
    return ref.model, ref.processor
