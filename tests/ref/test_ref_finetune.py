"""WeDetect-Ref stage-3 fine-tuning: targets, focal loss, data loading, a short run on the tiny model."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from wedetect.models.ref import REF_MODULES
from wedetect.ref import WeDetectRef
from wedetect.train.ref_finetune import (
    RefDataError,
    RefFinetuneConfig,
    RefSample,
    evaluate_loss,
    finetune_ref,
    load_ref_samples,
    soft_focal_loss,
    soft_targets,
)

FAST = dict(min_visual_tokens=16, max_visual_tokens=48)


def test_soft_focal_loss_matches_formula() -> None:
    logits = torch.tensor([2.0, -1.0, 0.5, -3.0])
    targets = torch.tensor([0.8, 0.0, 1.0, 0.6])
    expected = []
    for x, t in zip(logits.tolist(), targets.tolist()):
        p = 1 / (1 + math.exp(-x))
        ce = -(t * math.log(p) + (1 - t) * math.log(1 - p))
        p_t = p * t + (1 - p) * (1 - t)
        expected.append((0.25 * t + 0.75 * (1 - t)) * ce * (1 - p_t) ** 2)
    assert soft_focal_loss(logits, targets).item() == pytest.approx(sum(expected) / 4, rel=1e-6)
    # a confident correct prediction costs (almost) nothing, a confident wrong one a lot
    assert soft_focal_loss(torch.tensor([8.0]), torch.tensor([1.0])) < 1e-6
    assert soft_focal_loss(torch.tensor([-8.0]), torch.tensor([1.0])) > 1.0


def test_soft_targets() -> None:
    proposals = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 6], [50, 50, 60, 60], [100, 100, 110, 110]], dtype=torch.float)
    gts = torch.tensor([[0, 0, 10, 10], [200, 200, 220, 220]], dtype=torch.float)  # the 2nd matches nothing
    boxes, targets = soft_targets(proposals, gts, torch.Generator().manual_seed(0))
    assert len(boxes) == 5  # the unmatched GT is appended
    by_box = {tuple(b.tolist()): float(t) for b, t in zip(boxes, targets)}
    assert by_box[(0, 0, 10, 10)] == pytest.approx(1.0)
    assert by_box[(0, 0, 10, 6)] == pytest.approx(0.6)  # soft target = IoU above 0.5
    assert by_box[(50, 50, 60, 60)] == 0 and by_box[(100, 100, 110, 110)] == 0
    assert by_box[(200, 200, 220, 220)] == pytest.approx(1.0)
    # negatives: order kept, all targets 0
    boxes, targets = soft_targets(proposals, torch.zeros(0, 4))
    assert torch.equal(boxes, proposals) and not targets.any()
    # IoU exactly 0.5: the GT counts as covered (not appended) but the proposal is not positive
    half = torch.tensor([[0, 0, 10, 5]], dtype=torch.float)
    boxes, targets = soft_targets(half, torch.tensor([[0, 0, 10, 10]], dtype=torch.float))
    assert torch.equal(boxes, half) and targets.tolist() == [0.0]


def _write_data(tmp_path, n_images: int = 2):
    rng = np.random.default_rng(0)
    entries, proposals = [], {}
    for i in range(n_images):
        name = f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(tmp_path / name)
        proposals[name] = [[2, 2, 30, 30], [30, 10, 62, 46], [0, 0, 64, 48], [10, 20, 40, 44]]
        entries.append({"image": name, "class_name": f"thing {i}", "bounding_boxes": [[30, 10, 62, 46]]})
        entries.append({"image": name, "class_name": "nothing here", "bounding_boxes": []})
    entries.append(
        {"image": "img0.png", "class_name": "box", "caption": "a big box", "bounding_boxes": [[1, 1, 29, 31]]}
    )
    (tmp_path / "ann.json").write_text(json.dumps(entries))
    (tmp_path / "props.json").write_text(json.dumps(proposals))
    return tmp_path / "ann.json", tmp_path / "props.json"


def test_load_samples(tmp_path) -> None:
    ann, props = _write_data(tmp_path)
    samples = load_ref_samples(ann, props)
    assert len(samples) == 5 and samples[0].image == str(tmp_path / "img0.png")
    assert samples[1].gt_boxes.shape == (0, 4) and samples[-1].caption == "a big box"
    assert load_ref_samples(ann, props, num_proposals=2)[0].proposals.shape == (2, 4)
    (tmp_path / "props.json").write_text(json.dumps({"img0.png": []}))
    with pytest.raises(RefDataError, match="no proposals"):
        load_ref_samples(ann, props)


@pytest.mark.slow
def test_finetune_lowers_loss_and_reloads(tiny_ref_dir, tmp_path) -> None:
    ref = WeDetectRef.from_pretrained(tiny_ref_dir, **FAST)
    samples = load_ref_samples(*_write_data(tmp_path, n_images=1))
    before = {k: v.clone() for k, v in ref.model.state_dict().items()}
    config = RefFinetuneConfig(lr=5e-3, epochs=6, batch_size=2, grad_accum=2, warmup_ratio=0.0)
    loss_before = evaluate_loss(ref, samples, config)
    losses = finetune_ref(ref, samples, config, output_dir=tmp_path / "out", progress=False)
    assert len(losses) == 6  # 3 samples -> 2 micro-batches -> 1 optimizer step per epoch
    loss_after = evaluate_loss(ref, samples, config)
    assert loss_after < 0.5 * loss_before, (loss_before, loss_after, losses)

    after = ref.model.state_dict()
    trained = ("out_proj.",) + tuple(f"model.{m}." for m in REF_MODULES)
    for key, value in after.items():
        changed = not torch.equal(value, before[key])
        assert changed == key.startswith(trained), f"{key}: changed={changed}"

    scores = ref.score(samples[0].image, samples[0].query, samples[0].proposals)
    reloaded = WeDetectRef.from_pretrained(tmp_path / "out", **FAST)
    torch.testing.assert_close(reloaded.score(samples[0].image, samples[0].query, samples[0].proposals), scores)


def test_finetune_rejects_sample_without_boxes(tiny_model_and_processor) -> None:
    model, processor = tiny_model_and_processor
    ref = WeDetectRef(model, processor, **FAST)
    sample = RefSample("unused.png", "a cat", torch.zeros(0, 4), torch.zeros(0, 4))
    with pytest.raises(RefDataError, match="nothing to train on"):
        finetune_ref(ref, [sample], progress=False)


@pytest.mark.slow
def test_finetune_cli(tiny_ref_dir, tmp_path) -> None:
    from typer.testing import CliRunner

    from wedetect.cli import app

    ann, props = _write_data(tmp_path, n_images=1)
    out = tmp_path / "tuned"
    args = ["ref-finetune", "--ref-checkpoint", str(tiny_ref_dir), "--annotations", str(ann), "--proposals",
            str(props), "--output-dir", str(out), "--batch-size", "3", "--device", "cpu", "-q"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "1 steps on 3 samples" in result.output
    tuned = WeDetectRef.from_pretrained(out)
    original = WeDetectRef.from_pretrained(tiny_ref_dir)
    assert not torch.equal(tuned.model.out_proj.weight, original.model.out_proj.weight)
    torch.testing.assert_close(tuned.model.model.visual.merger.linear_fc2.weight,
                               original.model.model.visual.merger.linear_fc2.weight, atol=0, rtol=0)
    bad = CliRunner().invoke(app, ["ref-finetune", "--ref-checkpoint", str(tiny_ref_dir), "--annotations",
                                   str(tmp_path / "nope.json"), "--proposals", str(props), "--output-dir", str(out)])
    assert bad.exit_code == 2 and "not found" in bad.output
