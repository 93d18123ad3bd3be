"""Loss pieces beyond the oracle cases: the CIoU formula, an all-empty batch, GT padding."""
from __future__ import annotations

import math

import pytest
import torch

from wedetect.train.box_ops import bbox_ciou, dfl_expectation, make_priors
from wedetect.train.losses import DetectionLoss, pad_gt


def test_ciou_formula() -> None:
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    assert bbox_ciou(a, a).item() == pytest.approx(1.0, abs=1e-6)
    b = torch.tensor([[5.0, 0.0, 15.0, 10.0]])  # same shape, half overlap, centres 5 apart
    iou = 50 / (100 + 100 - 50 + 1e-7)
    expected = iou - 25 / (15**2 + 10**2 + 1e-7)
    assert bbox_ciou(a, b).item() == pytest.approx(expected, rel=1e-6)
    assert bbox_ciou(b, a).item() == pytest.approx(expected, rel=1e-6)
    c = torch.tensor([[0.0, 0.0, 20.0, 5.0]])  # different aspect ratio: the v term appears
    v = 4 / math.pi**2 * (math.atan(20 / 5) - math.atan(10 / 10)) ** 2
    iou = 50 / (100 + 100 - 50 + 1e-7)
    alpha = v / (v - iou + 1)
    rho2 = (20 - 10) ** 2 / 4 + (5 - 10) ** 2 / 4
    assert bbox_ciou(a, c).item() == pytest.approx(iou - rho2 / (400 + 100) - alpha * v, rel=1e-5)
    far = torch.tensor([[1000.0, 1000.0, 1001.0, 1001.0]])
    assert -1.0 <= bbox_ciou(a, far).item() < 0


def _ciou_reference(a: torch.Tensor, c: torch.Tensor, detach_alpha: bool) -> torch.Tensor:
    w1, h1 = a[2] - a[0], a[3] - a[1]
    w2, h2 = c[2] - c[0], c[3] - c[1]
    inter = (torch.min(a[2], c[2]) - torch.max(a[0], c[0])) * (torch.min(a[3], c[3]) - torch.max(a[1], c[1]))
    iou = inter / (w1 * h1 + w2 * h2 - inter + 1e-7)
    v = 4 / math.pi**2 * (torch.atan(w2 / (h2 + 1e-7)) - torch.atan(w1 / (h1 + 1e-7))) ** 2
    alpha = v / (v - iou + 1 + 1e-7)
    if detach_alpha:
        alpha = alpha.detach()
    cw = torch.max(a[2], c[2]) - torch.min(a[0], c[0])
    ch = torch.max(a[3], c[3]) - torch.min(a[1], c[1])
    rho2 = ((c[0] + c[2]) - (a[0] + a[2])) ** 2 / 4 + ((c[1] + c[3]) - (a[1] + a[3])) ** 2 / 4
    return iou - rho2 / (cw**2 + ch**2 + 1e-7) - alpha * v


def test_ciou_alpha_carries_no_gradient() -> None:
    c = torch.tensor([1.0, 2.0, 20.0, 5.0])
    grads = []
    for fn in (lambda a: bbox_ciou(a[None], c[None])[0], lambda a: _ciou_reference(a, c, True),
               lambda a: _ciou_reference(a, c, False)):
        a = torch.tensor([0.0, 0.0, 10.0, 10.0], requires_grad=True)
        fn(a).backward()
        grads.append(a.grad)
    torch.testing.assert_close(grads[0], grads[1])
    assert not torch.allclose(grads[0], grads[2])


def test_priors_and_dfl_decode() -> None:
    p = make_priors([(2, 3), (1, 2)], (8, 16))
    assert p.shape == (8, 4)
    assert p[:3, :2].tolist() == [[4, 4], [12, 4], [20, 4]] and p[3, :2].tolist() == [4, 12]
    assert p[6].tolist() == [8, 8, 16, 16]
    logits = torch.full((1, 64), -50.0)
    logits[0, [3, 16 + 5, 32 + 0, 48 + 15]] = 50.0
    torch.testing.assert_close(dfl_expectation(logits), torch.tensor([[3.0, 5.0, 0.0, 15.0]]))


def test_pad_gt_groups_rows_per_image() -> None:
    rows = torch.tensor([[0, 1, 1, 2, 3, 4], [2, 0, 5, 6, 7, 8], [2, 3, 9, 9, 10, 10]], dtype=torch.float32)
    out = pad_gt(rows, 3)
    assert out.shape == (3, 2, 5)
    assert out[0, 0].tolist() == [1, 1, 2, 3, 4] and out[0, 1].abs().sum() == 0
    assert out[1].abs().sum() == 0 and out[2, 1].tolist() == [3, 9, 9, 10, 10]
    assert pad_gt(torch.zeros(0, 6), 2).shape == (2, 0, 5)


def test_batch_without_boxes_trains_only_the_classifier_towards_zero() -> None:
    torch.manual_seed(0)
    cls = [torch.randn(2, 3, s, s, requires_grad=True) for s in (8, 4, 2)]
    reg = [torch.randn(2, 64, s, s, requires_grad=True) for s in (8, 4, 2)]
    out = DetectionLoss()(cls, reg, torch.zeros(0, 6), world_size=1)
    assert out.loss_bbox.item() == 0 and out.loss_dfl.item() == 0
    flat = torch.cat([c.detach().permute(0, 2, 3, 1).reshape(2, -1, 3) for c in cls], 1)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(flat, torch.zeros_like(flat), reduction="sum")
    assert out.loss_cls.item() == pytest.approx(0.5 * bce.item() * 2, rel=1e-5)  # S clamps to 1, x B
    assert (out.assign.assigned_labels == 3).all() and not out.assign.fg_mask.any()
    out.total.backward()
    assert all(r.grad is not None and r.grad.abs().sum() == 0 for r in reg)
    assert all((c.grad > 0).all() for c in cls)  # every logit is pushed down
