"""Validation during training is the user's evaluation of the saved checkpoint, on the EMA weights."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from train_helpers import tiny_config

from wedetect.checkpoint import load_into
from wedetect.eval.detection import evaluate_coco
from wedetect.inference import WeDetect
from wedetect.models.text import load_tokenizer
from wedetect.train import loop
from wedetect.train.embeddings import load_text_detector
from wedetect.train.loop import Trainer


def _user_rows(model, data: dict, batch_size: int) -> list[dict]:
    """COCO rows as `wedetect eval detection` computes them: every class name prompted, no blank prompt,
    score > 0.001, best 300 per image. (Same batch size as validation: CPU convolutions round
    differently for other batch sizes.)"""
    detector = WeDetect(model, load_tokenizer(data["tokenizer"]))
    detector.set_classes([names[0] for names in data["names"]], blank=False)
    gt = json.loads(Path(data["val"]).read_text(encoding="utf-8"))
    cat_ids = [c["id"] for c in gt["categories"]]
    paths = [data["root"] / "val" / image["file_name"] for image in gt["images"]]
    dets = detector.predict(paths, threshold=0.001, max_detections=300, batch_size=batch_size)
    return [row for image, det in zip(gt["images"], dets) for row in det.to_coco(image["id"], cat_ids)]


def _key(rows: list[dict]) -> list[tuple]:
    return sorted((r["image_id"], -r["score"], r["category_id"], *r["bbox"]) for r in rows)


@pytest.mark.slow
def test_validation_equals_evaluating_the_saved_ema_checkpoint(synth_data: dict, tmp_path: Path, monkeypatch) -> None:
    seen: list[list[dict]] = []

    def spy(gt, rows):
        seen.append(rows)
        return evaluate_coco(gt, rows)

    monkeypatch.setattr(loop, "evaluate_coco", spy)
    # A short EMA ramp (gamma 1) keeps the EMA weights far from the raw ones after two steps.
    cfg = tiny_config(synth_data, tmp_path / "run", epochs=1, ema=True, ema_gamma=1.0)
    trainer = Trainer(cfg, progress=False)
    with torch.no_grad():  # scores above the 0.001 cut from the start (the from-scratch bias is -10)
        for module in (trainer.model, trainer.ema.module):
            for contrast in module.head.cls_contrasts:
                contrast.bias.fill_(-3.0)
    trainer.fit()
    [validated] = seen
    assert len(validated) > 100
    reported = {k[len("val/"):]: v for k, v in trainer.history[-1].items() if k.startswith("val/")}

    ckpt = tmp_path / "run" / "epoch_1.pth"
    user = _user_rows(load_text_detector(ckpt), synth_data, cfg.data.val_batch_size)
    assert _key(user) == _key(validated)
    assert evaluate_coco(synth_data["val"], user).stats == reported

    raw = load_text_detector(ckpt)
    load_into(raw, torch.load(ckpt, map_location="cpu", weights_only=True)["raw_state_dict"], strict=True)
    assert _key(_user_rows(raw, synth_data, cfg.data.val_batch_size)) != _key(validated)  # the EMA weights were validated
    assert trainer.model.training  # validation left the trained network in training mode
