"""The fast post-processing equals the literal official order (as sets: exact ties may reorder)."""
from __future__ import annotations

import pytest
import torch
from torchvision.ops import box_iou, nms

from wedetect import postprocess
from wedetect.postprocess import (
    PostprocessConfig,
    UniPostprocessConfig,
    _topk,
    detector_postprocess,
    detector_postprocess_fast,
    nms_best_prefix,
    offset_batched_nms,
    uni_postprocess,
    uni_postprocess_fast,
)
from wedetect.structures import LetterboxMeta


def _inputs(n_priors: int, k: int, seed: int, spread: float):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n_priors, k, generator=g) * 2 - 1
    # Quantised logits: many exactly tied scores, as with real checkpoints.
    logits = (logits * 64).round() / 64
    centers = torch.rand(n_priors, 2, generator=g) * 640
    wh = torch.rand(n_priors, 2, generator=g) * spread + 1
    return logits, torch.cat([centers - wh / 2, centers + wh / 2], dim=1)


def _as_set(b, s, lab):
    return {(int(l_), round(float(s_), 6), tuple(round(float(v), 3) for v in bb)) for bb, s_, l_ in zip(b, s, lab)}


# The GPU runs other NMS regimes (one NMS over offset boxes where labels cannot meet; torchvision's
# per-class switch at 20000 coordinates), so the equality tests also run on CUDA when present.
CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"))


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("n_priors, k, spread", [(400, 3, 60.0), (2100, 5, 400.0), (8400, 4, 150.0), (8400, 8, 900.0)])
@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.6])
def test_fast_equals_reference(n_priors, k, spread, threshold, device, monkeypatch):
    # The fast path's NMS visits exactly tied scores in torchvision's (stable) order, the reference in
    # torch.sort's as mmcv: with the reference on torchvision's order the shortcuts must be exact.
    monkeypatch.setattr(postprocess, "mmcv_nms", nms)
    logits, boxes = (t.to(device) for t in _inputs(n_priors, k, seed=n_priors + k, spread=spread))
    meta = LetterboxMeta((720, 1280), 640, (0.5, 0.5), (140.0, 140.0, 0.0, 0.0))
    cfg = PostprocessConfig()
    b, s, lab = detector_postprocess(logits, boxes, meta, cfg)
    keep = s > threshold
    fb, fs, flab = detector_postprocess_fast(logits, boxes, meta, cfg, threshold)
    assert len(fs) == int(keep.sum())
    # The max_per_img cut may pick different members of an exactly tied group at the boundary.
    cut = float(s[-1]) if len(s) == cfg.max_per_img else -1.0
    above, fast_above = keep & (s > cut), fs > cut
    assert _as_set(fb[fast_above], fs[fast_above], flab[fast_above]) == _as_set(b[above], s[above], lab[above])
    torch.testing.assert_close(fs, s[keep])
    assert torch.all(fs[:-1] >= fs[1:]), "sorted by score"


def _greedy_nms_in_sort_order(boxes, scores, iou_threshold):
    """Greedy NMS written out: visit in torch.sort(descending=True) order, suppress IoU > threshold."""
    iou = box_iou(boxes, boxes)
    suppressed = torch.zeros(len(boxes), dtype=torch.bool)
    keep = []
    for i in scores.sort(descending=True)[1].tolist():
        if not suppressed[i]:
            keep.append(i)
            suppressed |= iou[i] > iou_threshold
    return torch.tensor(keep, dtype=torch.int64)


@pytest.mark.parametrize("split", [False, True])
def test_reference_nms_visits_ties_in_torch_sort_order(split, monkeypatch):
    """mmcv's NMS visits candidates in torch.sort's (unstable) order; torchvision's stable order keeps
    other members of tied, overlapping pairs. Four score values: ties everywhere."""
    g = torch.Generator().manual_seed(0)
    n = 600
    xy = torch.rand(n, 2, generator=g) * 300
    boxes = torch.cat([xy, xy + 40 + torch.rand(n, 2, generator=g) * 4], dim=1)
    scores = (torch.randint(0, 4, (n,), generator=g).float() + 1) / 8
    scores = scores.sort(descending=True)[0][torch.randperm(n, generator=g)]
    labels = torch.randint(0, 2, (n,), generator=g)
    assert not torch.equal(nms(boxes, scores, 0.7), _greedy_nms_in_sort_order(boxes, scores, 0.7)), \
        "the input has no tie that the two visiting orders resolve differently"
    assert torch.equal(postprocess.mmcv_nms(boxes, scores, 0.7), _greedy_nms_in_sort_order(boxes, scores, 0.7))
    if split:
        monkeypatch.setattr(postprocess, "_SPLIT_THR", 1)  # the per-label loop of >= 10000 candidates
    expected = []
    shifted = boxes + labels[:, None].float() * (boxes.max() + 1)
    if split:
        for label in (0, 1):
            idx = (labels == label).nonzero().view(-1)
            expected.append(idx[_greedy_nms_in_sort_order(shifted[idx], scores[idx], 0.7)])
        expected = torch.cat(expected)
        expected = expected[scores[expected].sort(descending=True)[1]]
    else:
        expected = _greedy_nms_in_sort_order(shifted, scores, 0.7)
    got = offset_batched_nms(boxes, scores, labels, 0.7)
    assert set(got.tolist()) == set(expected.tolist())
    assert torch.equal(scores[got], scores[expected])


def test_offset_trick_keeps_labels_apart_and_splits_at_10000():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [0.5, 0.0, 10.0, 10.0]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    labels = torch.tensor([0, 1, 0])
    assert offset_batched_nms(boxes, scores, labels, 0.7).tolist() == [0, 1]
    # A box far left of the image (x < -1) can meet another label's box after the offset in the
    # one-NMS path (< 10000 candidates) — the official behaviour, reproduced.
    wide = torch.tensor([[0.0, 0.0, 20.0, 20.0], [-21.0, -21.0, -1.0, -1.0]])
    out = offset_batched_nms(wide, torch.tensor([0.9, 0.8]), torch.tensor([0, 1]), 0.7)
    assert out.tolist() == [0]


def test_label_separation_check_is_exact():
    """Where the check allows one NMS over all offset boxes (the GPU path), it equals the per-label loop."""
    from wedetect.postprocess import _labels_cannot_meet, _per_label_nms

    wide = torch.tensor([[0.0, 0.0, 20.0, 20.0], [-21.0, -21.0, -1.0, -1.0]])
    labels = torch.tensor([0, 1])
    unit = wide.max() + 1
    shifted = wide + (labels.float() * unit)[:, None]
    assert not _labels_cannot_meet(wide, shifted, labels, unit, 0.7)
    allowed = 0
    for seed in range(30):
        g = torch.Generator().manual_seed(seed)
        n, k = 3000, 6
        c = torch.rand(n, 2, generator=g) * 700 - 30
        wh = torch.rand(n, 2, generator=g) * 80 + 1
        boxes = torch.cat([c - wh / 2, c + wh / 2], dim=1)
        scores = torch.rand(n, generator=g)
        labels = torch.randint(0, k, (n,), generator=g)
        unit = boxes.max() + 1
        shifted = boxes + (labels.float() * unit)[:, None]
        if _labels_cannot_meet(boxes, shifted, labels, unit, 0.7):
            allowed += 1
            single = nms(shifted, scores, 0.7)
            assert set(single.tolist()) == set(_per_label_nms(shifted, scores, labels, 0.7).tolist())
    assert allowed > 0


@pytest.mark.parametrize("n_priors, prompts, nms_pre, spread", [(2100, 16, 30000, 300.0), (8400, 32, 30000, 120.0),
                                                                (600, 8, 900, 400.0), (300, 3, 700, 60.0)])
@pytest.mark.parametrize("threshold", [0.0, 0.3])
@pytest.mark.parametrize("device, group", [("cpu", False), ("cpu", True), pytest.param(
    "cuda", None, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_uni_fast_equals_reference(n_priors, prompts, nms_pre, spread, threshold, device, group, monkeypatch):
    """Both torchvision regimes: per-prompt loop (many candidates) and one offset NMS (< 1000 on CPU);
    the per-prompt loop with prompts grouped into shared NMS calls (the GPU default) too."""
    monkeypatch.setattr(postprocess, "GROUP_LABELS", group)
    logits, boxes = (t.to(device) for t in _inputs(n_priors, prompts, seed=n_priors * prompts, spread=spread))
    meta = LetterboxMeta((480, 640), 640, (1.0, 1.0), (80.0, 80.0, 0.0, 0.0))
    cfg = UniPostprocessConfig(nms_pre=nms_pre)
    b, s, lab, prior = uni_postprocess(logits, boxes, meta, 300, cfg)
    keep = s > threshold
    fb, fs, flab, fprior = uni_postprocess_fast(logits, boxes, meta, 300, cfg, threshold)
    assert len(fs) == int(keep.sum())
    cut = float(s[-1]) if len(s) == 300 else -1.0
    above, fast_above = keep & (s > cut), fs > cut
    assert _as_set(fb[fast_above], fs[fast_above], flab[fast_above]) == _as_set(b[above], s[above], lab[above])
    assert set(fprior[fast_above].tolist()) == set(prior[above].tolist())
    torch.testing.assert_close(fs, s[keep])


def test_nms_best_prefix_stops_early_and_never_splits_ties():
    g = torch.Generator().manual_seed(0)
    n = 5000
    c = torch.rand(n, 2, generator=g) * 2000
    boxes = torch.cat([c, c + 20], dim=1)  # sparse: few suppressions, so a short prefix holds 300 keeps
    scores = (torch.rand(n, generator=g) * 50).round() / 50  # many ties, in no particular order
    seen = []

    def run(idx):
        seen.append(idx)
        assert torch.all(scores[idx][:-1] >= scores[idx][1:]), "prefix in descending score order"
        return nms(boxes[idx], scores[idx], 0.7)

    keep = nms_best_prefix(scores, n, 300, run)
    full = nms(boxes, scores, 0.7)
    assert len(seen[-1]) < n, "stopped before the whole list"
    for idx in seen:
        rest = torch.ones(n, dtype=torch.bool)
        rest[idx] = False
        assert len(idx) == n or scores[idx].min() > scores[rest].max(), "a prefix ended inside a tie group"
    cut = scores[full[299]]  # members of the tie group at rank 300 may differ, as in the reference
    assert len(keep) == 300
    assert set(keep[scores[keep] > cut].tolist()) == set(full[:300][scores[full[:300]] > cut].tolist())
    # Only the best n count as candidates.
    assert nms_best_prefix(scores, 10, 300, lambda idx: nms(boxes[idx], scores[idx], 0.7)).numel() == 10
    # Dense boxes: most are suppressed, the prefix grows to the whole list and returns every survivor.
    dense = torch.tensor([[0.0, 0.0, 10.0, 10.0]]).repeat(n, 1)
    out = nms_best_prefix(scores, n, 300, lambda idx: nms(dense[idx], scores[idx], 0.7))
    assert out.numel() == 1 and scores[out[0]] == scores.max()


@pytest.mark.parametrize("k", [0, 1, 300, 1200, 4800, 30000])
@pytest.mark.parametrize("ties", [False, True])
def test_sampled_topk_equals_topk(k, ties):
    g = torch.Generator().manual_seed(k)
    scores = (torch.randn(700_000, generator=g) * 2 - 6).sigmoid()
    if ties:
        scores = (scores * 64).round() / 64  # a few values only: the pool guess is far off
    values, idx = _topk(scores, k)
    torch.testing.assert_close(values, scores.topk(k).values, rtol=0, atol=0)
    assert torch.equal(scores[idx], values) and idx.unique().numel() == k


def _crowd(n: int, labels: int, seed: int, quantised: bool):
    """Boxes in clusters (many near-duplicates across labels, as Uni's prompts give), scores per pair."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(n // 20 + 1, 2, generator=g) * 600
    c = centres[torch.randint(0, len(centres), (n,), generator=g)] + torch.randn(n, 2, generator=g) * 6
    wh = 30 + torch.rand(n, 2, generator=g) * 40
    boxes = torch.cat([c - wh / 2, c + wh / 2], dim=1)
    scores = torch.rand(n, generator=g)
    if quantised:
        scores = (scores * 40).round() / 40
    return boxes, scores, torch.randint(0, labels, (n,), generator=g)


@pytest.mark.parametrize("n, labels, quantised", [(1200, 256, False), (4800, 256, False), (1200, 256, True),
                                                  (3000, 40, True)])
def test_grouped_label_nms_equals_one_call_per_label(n, labels, quantised):
    """Labels share an NMS call only when no pair of their boxes comes near the threshold, and a label
    with an overlapping tied pair keeps its own call: the survivors are the per-label calls' survivors."""
    from wedetect.postprocess import _IOU_MARGIN, _label_groups, _per_label_nms

    boxes, scores, lab = _crowd(n, labels, seed=n + labels, quantised=quantised)
    per_label = _per_label_nms(boxes, scores, lab, 0.7, group=False)
    grouped = _per_label_nms(boxes, scores, lab, 0.7, group=True)
    assert torch.equal(grouped, per_label)
    group = _label_groups(boxes, scores, lab, 0.7)
    assert group.unique().numel() < lab.unique().numel(), "fewer NMS calls than labels"
    # No two labels of one group have a pair near the threshold.
    near = box_iou(boxes, boxes) > 0.7 - _IOU_MARGIN
    assert not (near & (group[:, None] == group[None, :]) & (lab[:, None] != lab[None, :])).any()
    # Every label of a group has all of its candidates in that group.
    for label in lab.unique():
        assert group[lab == label].unique().numel() == 1


def test_grouping_separates_labels_at_the_threshold_and_isolates_tied_pairs():
    from wedetect.postprocess import _label_groups, _per_label_nms

    # Labels 0 and 1: IoU exactly 0.7 (not suppressed: the kernels test > 0.7) -> still kept apart.
    # Label 2: two identical boxes with the same score (which survives depends on the call's sort).
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 7.0], [50.0, 50.0, 60.0, 60.0],
                          [50.0, 50.0, 60.0, 60.0], [200.0, 0.0, 210.0, 10.0]])
    scores = torch.tensor([0.9, 0.8, 0.5, 0.5, 0.4])
    lab = torch.tensor([0, 1, 2, 2, 3])
    assert float(box_iou(boxes[:1], boxes[1:2])) == pytest.approx(0.7)
    group = _label_groups(boxes, scores, lab, 0.7).tolist()
    assert group[0] != group[1] and group[2] == group[3]
    assert group[2] not in (group[0], group[1], group[4]), "the tied label has a call of its own"
    assert group[4] in (group[0], group[1]), "label 3 meets nobody: it shares a call"
    assert torch.equal(_per_label_nms(boxes, scores, lab, 0.7, group=True),
                       _per_label_nms(boxes, scores, lab, 0.7, group=False))
