"""Class embeddings for closed-set finetuning (official ``generate_class_embedding.py``).

Row k is the detector's text embedding of the FIRST name of class k: ``<s>`` hidden state ->
projection -> L2 normalisation, encoded in chunks of 80 names with padding and no truncation.
The official script leaves dropout on (its output is noisy); here the tower runs in eval mode
unless ``dropout=True`` asks for the official behaviour.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from wedetect.checkpoint import CheckpointError, detect_size, load_into, read_state_dict
from wedetect.config import get_config
from wedetect.models.detector import WeDetectModel


def load_text_detector(checkpoint: str | os.PathLike, device: str | torch.device = "cpu") -> WeDetectModel:
    """A detector with its text tower from an official checkpoint or one written by ``wedetect train``."""
    state = read_state_dict(checkpoint)
    if not any(k.startswith("backbone.text_model.") for k in state):
        raise CheckpointError(f"{checkpoint}: has no text tower (a closed-set or Uni checkpoint?); "
                              "class embeddings need an open-vocabulary detector checkpoint")
    try:
        config = get_config(detect_size(state))
    except CheckpointError:
        config = _config_from_training_meta(checkpoint)
    model = WeDetectModel(config, with_text=True)
    model.unused_official_state = load_into(model, state, strict=True)
    return model.to(device).eval()


def _config_from_training_meta(checkpoint: str | os.PathLike):
    """The model config of a custom-size checkpoint, read from the training config in its ``meta``."""
    import yaml

    from wedetect.train.config import TrainConfig

    obj = torch.load(Path(checkpoint), map_location="cpu", weights_only=True)
    cfg_text = obj.get("meta", {}).get("cfg") if isinstance(obj, dict) else None
    if not cfg_text:
        raise CheckpointError(f"{checkpoint}: not an official size and no training config in its meta")
    cfg = TrainConfig.model_validate(yaml.safe_load(cfg_text))
    return cfg.model.build_config(cfg.data.image_size)


@torch.no_grad()
def class_embeddings(model: WeDetectModel, tokenizer, class_names: list[list[str]], dropout: bool = False,
                     chunk_size: int = 80) -> np.ndarray:
    """(K, D) float32 unit-length embeddings of each class's first name."""
    names = [synonyms[0] for synonyms in class_names]
    tower = model.text_tower
    was_training = tower.training
    tower.train(dropout)
    device = next(tower.parameters()).device
    try:
        rows = []
        for start in range(0, len(names), chunk_size):
            tok = tokenizer(names[start:start + chunk_size], padding=True, return_tensors="pt")
            rows.append(model.encode_text(tok["input_ids"].to(device), tok["attention_mask"].to(device)).float())
    finally:
        tower.train(was_training)
    emb = torch.nn.functional.normalize(torch.cat(rows), dim=-1)
    return emb.cpu().numpy().astype(np.float32)
