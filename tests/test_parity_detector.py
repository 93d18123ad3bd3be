"""Oracle parity: every detector / Uni fixture in the parity folder, stage by stage.

For each case the official-layout checkpoint is built from its key list with the deterministic
weights, saved in the official file format and loaded through the public API, then compared:
text features, letterboxed input (exact), backbone/neck samples, head logits and distances,
and the final detections / proposals.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from paths import parity_dir
from wedetect import WeDetect, WeDetectUni
from wedetect.data.io import load_bgr, load_pil_rgb
from wedetect.data.letterbox import letterbox_detector, letterbox_uni, to_tensor


def _cases(kind: str) -> list[Path]:
    root = parity_dir()
    found = []
    for p in sorted(root.glob("*.json")):
        try:
            info = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(info, dict) and info.get("kind") == kind and p.with_suffix(".npz").exists():
            found.append(p)
    return found


DETECTOR_CASES = _cases("detector")
UNI_CASES = _cases("uni")


def _close(ours: torch.Tensor | np.ndarray, ref: np.ndarray, rtol: float = 1e-4, what: str = "") -> None:
    ours = ours.detach().cpu().numpy() if isinstance(ours, torch.Tensor) else np.asarray(ours)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != {ref.shape}"
    scale = max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(ours, ref, rtol=rtol, atol=rtol * scale, err_msg=what)


def _check_samples(ours: list[torch.Tensor], ref, prefix: str) -> None:
    for i, t in enumerate(ours):
        shape = tuple(int(s) for s in ref[f"{prefix}_{i}_shape"])
        assert tuple(t.shape) == shape, f"{prefix}_{i} shape {tuple(t.shape)} != {shape}"
        flat = t.detach().reshape(-1).cpu()
        _close(flat[torch.from_numpy(ref[f"{prefix}_{i}_idx"])], ref[f"{prefix}_{i}_val"], what=f"{prefix}_{i} samples")
        assert abs(flat.double().mean().item() - float(ref[f"{prefix}_{i}_mean"])) <= 1e-4 * max(1.0, float(ref[f"{prefix}_{i}_std"]))
        assert flat.double().std().item() == pytest.approx(float(ref[f"{prefix}_{i}_std"]), rel=1e-4)


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def match_detections(ours_boxes, ours_scores, ours_labels, ref_boxes, ref_scores, ref_labels) -> np.ndarray:
    """One-to-one match of every official detection (same label; IoU > 0.999 or all coords within
    1e-3 px; score within 1e-4). Returns, per official detection, the index of its match in ours."""
    assert len(ours_boxes) == len(ref_boxes), f"{len(ours_boxes)} detections, official {len(ref_boxes)}"
    iou = _box_iou(ref_boxes, ours_boxes)
    near = np.abs(ref_boxes[:, None, :] - ours_boxes[None, :, :]).max(-1) <= 1e-3
    ok = (ref_labels[:, None] == ours_labels[None, :]) & ((iou > 0.999) | near)
    ok &= np.abs(ref_scores[:, None] - ours_scores[None, :]) <= 1e-4
    taken = np.zeros(len(ours_boxes), dtype=bool)
    match = np.full(len(ref_boxes), -1)
    for i in np.argsort(ok.sum(1)):  # most constrained first
        cands = np.flatnonzero(ok[i] & ~taken)
        assert cands.size, f"official detection {i} (label {ref_labels[i]}, box {ref_boxes[i]}, score {ref_scores[i]}) unmatched"
        j = cands[np.argmin(np.abs(ours_scores[cands] - ref_scores[i]))]
        taken[j] = True
        match[i] = j
    return match


@pytest.mark.parity
@pytest.mark.slow
@pytest.mark.parametrize("case", DETECTOR_CASES, ids=lambda p: p.stem)
def test_detector_parity(case: Path, official_checkpoint, parity_device):
    info = json.loads(case.read_text(encoding="utf-8"))
    ref = np.load(case.with_suffix(".npz"))
    model = WeDetect.from_pretrained(official_checkpoint(info["keys"]), device=parity_device)
    assert model.config.name == info["size"]

    # Text tower, from the fixture's token ids (stand-ins for the real XLM-R tokenizer).
    text = model.encode_token_ids(torch.from_numpy(ref["input_ids"]), torch.from_numpy(ref["attention_mask"]))
    _close(text, ref["text_feats"], what="text_feats")

    # Pre-processing: exact letterbox and metadata.
    image = case.parent / info["image"]
    rgb, meta = letterbox_detector(load_bgr(image), model.config.input_size)
    np.testing.assert_array_equal(rgb, ref["input_rgb_uint8"])
    assert list(meta.orig_size) == info["ori_shape"]
    assert list(meta.scale) == info["scale_factor"]
    assert [meta.pad[0], meta.pad[1], meta.pad[2], meta.pad[3]] == info["pad_param"]

    # Backbone, neck, head.
    net = model.model
    with torch.inference_mode():
        x = to_tensor([rgb]).to(model.device)
        backbone = net.forward_backbone(x)
        _check_samples(backbone, ref, "backbone")
        feats = net.neck(backbone)
        _check_samples(feats, ref, "neck")
        cls_logits, reg_raw = net.forward_head(feats, text[None])
    for i, (lg, rg) in enumerate(zip(cls_logits, reg_raw)):
        _close(lg, ref[f"cls_logits_{i}"], what=f"cls_logits_{i}")
        _close(net.head.distances(rg), ref[f"bbox_preds_{i}"], what=f"bbox_preds_{i}")

    # Final detections, through the public predict path, before the blank prompt is dropped.
    names = info["prompts"]
    model.set_class_embeddings(text[:-1], names[:-1], blank_embedding=text[-1])
    for mode in ("reference", "fast"):  # the literal official order, and the exact shortcuts
        model.mode = mode
        det = model.predict(image, threshold=0.0, max_detections=10_000, keep_blank=True)[0]
        assert len(det) == info["num_dets"], mode
        match_detections(det.boxes.numpy(), det.scores.numpy(), det.labels.numpy(),
                         ref["det_bboxes"], ref["det_scores"], ref["det_labels"])
    # Users never see the blank prompt.
    shown = model.predict(image, threshold=0.0, max_detections=10_000)[0]
    assert (shown.labels < len(names) - 1).all()
    assert len(shown) == int((ref["det_labels"] < len(names) - 1).sum())


@pytest.mark.parity
@pytest.mark.slow
@pytest.mark.parametrize("case", UNI_CASES, ids=lambda p: p.stem)
def test_uni_parity(case: Path, official_checkpoint, parity_device):
    info = json.loads(case.read_text(encoding="utf-8"))
    ref = np.load(case.with_suffix(".npz"))
    uni = WeDetectUni.from_pretrained(official_checkpoint(info["keys"]), device=parity_device)
    assert uni.config.name == info["size"]
    image = case.parent / info["image"]
    rgb, _ = letterbox_uni(load_pil_rgb(image), uni.config.input_size)
    np.testing.assert_array_equal(rgb, ref["input_rgb_uint8"])

    n = len(ref["scores"])
    labels = np.zeros(n, dtype=np.int64)  # the official script returns no labels: match on box + score
    for mode in ("reference", "fast"):  # the literal official order, and the exact shortcuts
        uni.mode = mode
        props = uni.propose(image, num_proposals=n, score_threshold=0.0)[0]
        match = match_detections(props.boxes.numpy(), props.scores.numpy(), np.zeros(len(props), dtype=np.int64),
                                 ref["bboxes"], ref["scores"], labels)
        _close(props.embeddings.numpy()[match], ref["embeddings"], what=f"proposal embeddings ({mode})")
    # The stored per-box scale/bias reproduce each proposal's score from its embedding and prompt.
    prompts = uni.model.prompts.detach().float().cpu()[props.labels]
    logit = (props.embeddings * prompts).sum(-1) * props.logit_scale.exp() + props.logit_bias
    np.testing.assert_allclose(logit.sigmoid().numpy(), props.scores.numpy(), rtol=1e-4, atol=1e-6)
