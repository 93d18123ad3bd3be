"""Proof that training learns: a very small WeDetect trained from scratch on synthetic data reaches AP50 >= 0.5."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from train_helpers import write_char_tokenizer

from wedetect.data.synth import SynthConfig, class_names, make_dataset
from wedetect.train.config import load_config
from wedetect.train.loop import Trainer

IMAGE_SIZE = 128


@pytest.mark.slow
def test_small_open_vocab_model_learns_synthetic_detection(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: one thread is fastest, and robust on a shared machine
    try:
        synth = SynthConfig(num_train=320, num_val=48, image_size=IMAGE_SIZE, min_object_size=IMAGE_SIZE // 6,
                            max_object_size=IMAGE_SIZE // 2, max_objects=3, seed=11)
        paths = make_dataset(synth, tmp_path / "data", progress=False)
        tokenizer = write_char_tokenizer(tmp_path / "tokenizer.json", [n for c in class_names(synth) for n in c])
        cfg = load_config("synth_nano", ["augment.scaling_ratio_range=[0.75, 1.25]"], **{
            "data.train_ann": str(paths["train"]), "data.train_images": str(tmp_path / "data" / "train"),
            "data.val_ann": str(paths["val"]), "data.val_images": str(tmp_path / "data" / "val"),
            "data.classes_file": str(paths["classes"]), "data.image_size": IMAGE_SIZE, "tokenizer": str(tokenizer),
            "output": str(tmp_path / "run"), "seed": 0, "device": "cpu", "augment.mosaic": False,
            "optim.lr": 0.004, "epochs": 10, "val_interval": 10,
        })
        start = time.time()
        trainer = Trainer(cfg, progress=False)
        state = trainer.fit()
        elapsed = time.time() - start
    finally:
        torch.set_num_threads(threads)
    final = trainer.history[-1]
    losses = [h["loss"] for h in trainer.history]
    assert losses[-1] < 0.6 * losses[0], losses
    assert final["val/mAP_50"] >= 0.5, (final, elapsed)
    assert state.best_epoch == 10 and (tmp_path / "run" / "best.pth").is_file()
