"""Shared helpers for the training tests: a character-level XLM-R-style tokenizer and synthetic data."""
from __future__ import annotations

import json

import pytest
from tokenizer_utils import make_tiny_tokenizer


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> dict:
    """A small synthetic dataset (train 48 / val 16 images at 160 px) plus a matching tokenizer."""
    from wedetect.data.synth import SynthConfig, class_names, make_dataset

    root = tmp_path_factory.mktemp("synth")
    cfg = SynthConfig(num_train=48, num_val=16, image_size=160, seed=3)
    paths = make_dataset(cfg, root, progress=False)
    names = [n for syn in class_names(cfg) for n in syn]
    paths["tokenizer"] = make_tiny_tokenizer(root / "tokenizer.json", names)
    paths["root"] = root
    paths["names"] = json.loads(paths["classes"].read_text(encoding="utf-8"))
    return paths
