"""Proof that training learns: a very small WeDetect trained from scratch on `wedetect data synth` data
reaches validation AP50 >= 0.5.

The run goes through the closed-set path end to end: a freshly initialised small open-vocabulary model
is saved, its class embeddings are extracted (`class-embeddings`), and the closed-set model is trained
from that checkpoint (so, from scratch). A text tower trained from scratch needs far longer than the
CI budget to tell nine compositional names apart, which is why the classifier here is the learnable
embedding matrix.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizer_utils import make_tiny_tokenizer

from wedetect.checkpoint import official_state_dict
from wedetect.data.synth import SynthConfig, class_names, make_dataset
from wedetect.models.text import load_tokenizer
from wedetect.train.config import load_config
from wedetect.train.embeddings import class_embeddings, load_text_detector
from wedetect.train.loop import Trainer, build_model

IMAGE_SIZE = 128


@pytest.mark.slow
def test_small_model_learns_synthetic_detection(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: one thread is fastest, and robust on a shared machine
    try:
        synth = SynthConfig(num_train=320, num_val=48, image_size=IMAGE_SIZE, min_object_size=IMAGE_SIZE // 6,
                            max_object_size=IMAGE_SIZE // 2, max_objects=3, seed=11)
        paths = make_dataset(synth, tmp_path / "data", progress=False)
        tokenizer = make_tiny_tokenizer(tmp_path / "tokenizer.json", [n for c in class_names(synth) for n in c])
        data = {
            "data.train_ann": str(paths["train"]), "data.train_images": str(tmp_path / "data" / "train"),
            "data.val_ann": str(paths["val"]), "data.val_images": str(tmp_path / "data" / "val"),
            "data.classes_file": str(paths["classes"]), "data.image_size": IMAGE_SIZE, "tokenizer": str(tokenizer),
            "seed": 0, "device": "cpu", "augment.mosaic": False, "optim.lr": 0.004, "epochs": 10,
            "val_interval": 10,
        }
        recipe = ["augment.scaling_ratio_range=[0.75, 1.25]"]
        torch.manual_seed(0)
        open_vocab = load_config("synth_nano", recipe, **data)
        initial = build_model(open_vocab)
        torch.save({"state_dict": official_state_dict(initial), "meta": {"cfg": open_vocab.dump()}},
                   tmp_path / "init.pth")
        names = json.loads(paths["classes"].read_text(encoding="utf-8"))
        emb = class_embeddings(load_text_detector(tmp_path / "init.pth"), load_tokenizer(tokenizer), names)
        np.save(tmp_path / "emb.npy", emb)

        cfg = load_config("synth_nano", recipe, **data, flavour="closed_set", checkpoint=str(tmp_path / "init.pth"),
                          class_embeddings=str(tmp_path / "emb.npy"), output=str(tmp_path / "run"))
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
