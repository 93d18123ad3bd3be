"""Helpers for the training tests (a module name no other test folder uses)."""
from __future__ import annotations

from pathlib import Path


def tiny_config(data: dict, output: Path, *overrides: str, **values):
    """The shipped synth_nano config shrunk for unit tests: 64 px inputs, 2 images a batch, 2 batches an epoch."""
    from wedetect.train.config import load_config

    base = {
        "data.train_ann": str(data["train"]), "data.train_images": str(data["root"] / "train"),
        "data.val_ann": str(data["val"]), "data.val_images": str(data["root"] / "val"),
        "data.classes_file": str(data["classes"]), "data.image_size": 64, "data.num_workers": 0,
        "tokenizer": str(data["tokenizer"]), "output": str(output), "epochs": 2, "batch_size": 2,
        "max_iters_per_epoch": 2, "seed": 7, "device": "cpu", "log_interval": 1000,
        "optim.warmup_iters": 2,
    }
    base.update(values)
    return load_config("synth_nano", list(overrides), **base)
