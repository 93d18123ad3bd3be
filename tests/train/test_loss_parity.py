"""Loss + assigner parity against the official finetune's recorded loss cases (tests/fixtures/train)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from paths import train_dir

from wedetect.train.losses import DetectionLoss

CASES = sorted(p.stem for p in train_dir().glob("*.json")) if train_dir().is_dir() else []


def _load(name: str):
    meta = json.loads((train_dir() / f"{name}.json").read_text())
    arrays = dict(np.load(train_dir() / f"{name}.npz"))
    return meta, arrays


def _inputs(arrays: dict, meta: dict):
    levels = range(len(meta["strides"]))
    scale = meta["input_quant_scale"]
    cls = [torch.tensor(arrays[f"cls_logits_q_{l}"].astype(np.float32) / scale, requires_grad=True) for l in levels]
    reg = [torch.tensor(arrays[f"reg_raw_q_{l}"].astype(np.float32) / scale, requires_grad=True) for l in levels]
    return cls, reg, torch.from_numpy(arrays["bboxes_labels"])


def _close(actual: torch.Tensor, expected: np.ndarray, atol: float, rtol: float) -> None:
    np.testing.assert_allclose(actual.detach().numpy(), expected, atol=atol, rtol=rtol)


@pytest.mark.parity
@pytest.mark.parametrize("name", CASES, ids=CASES)
def test_loss_assignment_and_gradients_match_official(name: str) -> None:
    meta, arrays = _load(name)
    cls, reg, gt = _inputs(arrays, meta)
    out = DetectionLoss(strides=tuple(meta["strides"]), reg_max=meta["reg_max"])(cls, reg, gt, world_size=1)

    for key, ref in meta["losses"].items():
        got = float(getattr(out, key).detach())
        assert got == pytest.approx(ref, rel=1e-5, abs=1e-6 if ref == 0 else 0), key
    assert float(out.assigned_scores_sum) == pytest.approx(meta["assigned_scores_sum_clamped"], rel=1e-5)

    np.testing.assert_array_equal(out.priors.numpy(), arrays["priors"])
    _close(out.pred_bboxes, arrays["pred_bboxes"], atol=1e-3, rtol=0)
    np.testing.assert_array_equal(out.gt_info.numpy(), arrays["gt_info"])

    a = out.assign
    fg = arrays["fg_mask"]
    np.testing.assert_array_equal(a.fg_mask.numpy(), fg)
    np.testing.assert_array_equal(a.assigned_gt_idx.numpy(), arrays["assigned_gt_idx"])
    np.testing.assert_array_equal(a.assigned_labels.numpy()[fg], arrays["assigned_labels"][fg])
    np.testing.assert_array_equal(a.assigned_bboxes.numpy()[fg], arrays["assigned_bboxes"][fg])
    _close(a.assigned_scores, arrays["assigned_scores"], atol=1e-5, rtol=1e-4)
    assert int(a.fg_mask.sum()) == meta["num_pos"]
    if "pos_mask" in arrays:
        np.testing.assert_array_equal(a.pos_mask_candidates.numpy(), arrays["pos_mask_candidates"])
        np.testing.assert_array_equal(a.pos_mask.numpy(), arrays["pos_mask"])
        _close(a.overlaps, arrays["overlaps"], atol=2e-6, rtol=1e-4)
        _close(a.alignment_metrics, arrays["alignment_metrics"], atol=2e-6, rtol=1e-4)

    out.total.backward()
    for l in range(len(meta["strides"])):
        _close(cls[l].grad, arrays[f"grad_cls_{l}"], atol=1e-6, rtol=1e-4)
        _close(reg[l].grad, arrays[f"grad_reg_{l}"], atol=1e-6, rtol=1e-4)


@pytest.mark.parity
@pytest.mark.parametrize("name", CASES, ids=CASES)
def test_loss_scales_with_world_size(name: str) -> None:
    meta, arrays = _load(name)
    cls, reg, gt = _inputs(arrays, meta)
    out = DetectionLoss(strides=tuple(meta["strides"]), reg_max=meta["reg_max"])(cls, reg, gt, world_size=8)
    for key, ref in meta["losses_world_size_8"].items():
        assert float(getattr(out, key).detach()) == pytest.approx(ref, rel=1e-5), key
