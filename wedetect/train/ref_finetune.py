"""Fine-tune WeDetect-Ref on referring-expression data with the official stage-3 objective.

Each sample is an image, an expression and its ground-truth boxes (possibly none: a negative
expression). Its proposals (WeDetect-Uni boxes, precomputed) become the ``<object>`` tokens:

1. ground truths whose best IoU over the proposals is below 0.5 are appended as extra proposals,
   and the proposals are shuffled (only when there are ground truths, as the official code);
2. each proposal's target is its best IoU with a ground truth when above 0.5, else 0 (soft targets);
3. the loss is a sigmoid focal loss (alpha 0.25, gamma 2) against these soft targets, averaged over
   all proposals of the batch (the official code computes a positive count and ignores it).

By default only the scoring head (``out_proj``) and the object embedder / position encodings are
trained; ``train_llm=True`` also trains the language model (the official stage 3). The vision tower
always stays frozen, as in every official stage.

Data format (official): a JSON list of ``{"image", "class_name", "bounding_boxes": [[x1,y1,x2,y2],..],
"caption"?}`` and a proposal JSON ``{image: [[x1,y1,x2,y2], ...]}`` keyed by the same ``image`` string.
"""
from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_iou
from tqdm.auto import tqdm

from wedetect.errors import WeDetectError
from wedetect.models.ref import REF_MODULES
from wedetect.ref import NUM_PROPOSALS, WeDetectRef, as_boxes

POSITIVE_IOU = 0.5


class RefDataError(WeDetectError):
    """Malformed or inconsistent referring-expression training data."""


@dataclass
class RefSample:
    """One training expression: image path, expression, GT boxes (K, 4) and proposals (M, 4), xyxy pixels."""

    image: str
    query: str
    gt_boxes: Tensor
    proposals: Tensor
    caption: str | None = None


@dataclass
class RefFinetuneConfig:
    """Optimisation settings (official stage 3: lr 1e-5, 1 epoch, warmup 5 %, linear decay, clip 5)."""

    lr: float = 1e-4
    epochs: int = 1
    batch_size: int = 2
    grad_accum: int = 1
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    max_grad_norm: float = 5.0
    train_llm: bool = False
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    seed: int = 0


def soft_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Sigmoid focal loss with soft targets in [0, 1], averaged over all elements (computed in float32)."""
    logits, targets = logits.float(), targets.float()
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return (alpha_t * ce * (1 - p_t) ** gamma).mean()


def soft_targets(
    proposals: Tensor, gt_boxes: Tensor, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """The scored boxes and their soft targets for one sample (see the module docstring)."""
    proposals, gt_boxes = proposals.float().reshape(-1, 4), gt_boxes.float().reshape(-1, 4)
    if len(gt_boxes) == 0:
        return proposals, torch.zeros(len(proposals))
    if len(proposals):
        best = box_iou(gt_boxes, proposals).max(dim=1).values
        boxes = torch.cat([proposals, gt_boxes[best < POSITIVE_IOU]])
    else:
        boxes = gt_boxes.clone()
    boxes = boxes[torch.randperm(len(boxes), generator=generator)]
    iou = box_iou(boxes, gt_boxes).max(dim=1).values
    return boxes, torch.where(iou > POSITIVE_IOU, iou, torch.zeros_like(iou))


def load_ref_samples(
    annotations: str | Path,
    proposals: str | Path,
    image_root: str | Path | None = None,
    num_proposals: int = NUM_PROPOSALS,
) -> list[RefSample]:
    """Read the official stage-3 JSON files. Relative image paths resolve against ``image_root``
    (default: the annotation file's folder); proposals are looked up by the sample's ``image`` string."""
    annotations, proposals = Path(annotations), Path(proposals)
    for path in (annotations, proposals):
        if not path.is_file():
            raise RefDataError(f"file not found: {path}")
    entries = json.loads(annotations.read_text())
    boxes_by_image = json.loads(proposals.read_text())
    if not isinstance(entries, list) or not isinstance(boxes_by_image, dict):
        raise RefDataError("annotations must be a JSON list of samples and proposals a JSON object {image: boxes}")
    root = Path(image_root) if image_root is not None else annotations.parent
    missing = sorted({e.get("image") for e in entries if e.get("image") not in boxes_by_image}, key=str)
    if missing:
        raise RefDataError(f"{len(missing)} images have no proposals in {proposals}, e.g. {missing[:3]}")
    samples = []
    for i, e in enumerate(entries):
        if not isinstance(e.get("class_name"), str) or not e["class_name"].strip():
            raise RefDataError(f"sample {i} ({e.get('image')}) has no class_name expression")
        try:
            gt = as_boxes(e.get("bounding_boxes", []))
            props = as_boxes(boxes_by_image[e["image"]][:num_proposals])
        except WeDetectError as err:
            raise RefDataError(f"sample {i} ({e['image']}): {err}") from err
        path = Path(e["image"])
        samples.append(
            RefSample(str(path if path.is_absolute() else root / path), e["class_name"], gt, props, e.get("caption"))
        )
    return samples


def trainable_parameters(ref: WeDetectRef, train_llm: bool) -> list[torch.nn.Parameter]:
    """Freeze everything but the head and the Ref modules (plus the language model if asked)."""
    model = ref.model
    model.requires_grad_(False)
    modules = [model.out_proj, *(getattr(model.model, name) for name in REF_MODULES)]
    if train_llm:
        modules.append(model.model.language_model)
    for module in modules:
        module.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def batch_loss(ref: WeDetectRef, batch: Sequence[RefSample], config: RefFinetuneConfig, generator) -> Tensor:
    """Focal loss of one micro-batch (one padded LLM pass over its samples)."""
    model = ref.model
    prepared, features, boxes, targets, rows = [], [], [], [], []
    for sample in batch:
        b, t = soft_targets(sample.proposals, sample.gt_boxes, generator)
        if len(b) == 0:
            raise RefDataError(f"{sample.image}: no proposals and no ground truth, nothing to train on")
        if len(b) > ref.max_proposals:
            raise RefDataError(f"{sample.image}: {len(b)} boxes exceed max_proposals={ref.max_proposals}")
        image = ref.prepare(sample.image)
        prepared.append(image)
        grid = image.image_grid_thw.to(model.device)
        features += model.encode_images(image.pixel_values.to(model.device, model.dtype), grid)
        boxes.append(b.to(model.device))
        targets.append(t)
        num_image_tokens = int(image.image_grid_thw[0].prod()) // ref.merge_size**2
        prompt = ref.prompt(sample.query, len(b), caption=sample.caption)
        rows.append(ref.tokenize([prompt], num_image_tokens, len(b))[0][0])
    input_ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=ref.pad_token_id)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(r) for r in rows], batch_first=True)
    out = model(
        input_ids.to(model.device),
        boxes=boxes,
        original_sizes=[im.original_wh for im in prepared],
        attention_mask=mask.to(model.device),
        vision_features=features,
    )
    logits = torch.cat(out.proposal_logits)
    return soft_focal_loss(logits, torch.cat(targets).to(logits.device), config.focal_alpha, config.focal_gamma)


@torch.no_grad()
def evaluate_loss(ref: WeDetectRef, samples: Sequence[RefSample], config: RefFinetuneConfig | None = None) -> float:
    """Focal loss over ``samples``: per-batch losses averaged with batch-size weights. Proposal
    shuffling is seeded by ``config.seed``, so the value is repeatable (e.g. before/after training)."""
    config = config or RefFinetuneConfig()
    generator = torch.Generator().manual_seed(config.seed)
    batches = [samples[i : i + config.batch_size] for i in range(0, len(samples), config.batch_size)]
    return sum(float(batch_loss(ref, b, config, generator)) * len(b) for b in batches) / len(samples)


def finetune_ref(
    ref: WeDetectRef,
    samples: Sequence[RefSample],
    config: RefFinetuneConfig | None = None,
    output_dir: str | Path | None = None,
    progress: bool = True,
) -> list[float]:
    """Train in place and return the loss of every optimizer step; save to ``output_dir`` at the end.

    Parameters are updated in the model's dtype: load the model in float32 for training (bf16
    weights lose small AdamW updates).
    """
    config = config or RefFinetuneConfig()
    if not samples:
        raise RefDataError("no training samples")
    if min(config.epochs, config.batch_size, config.grad_accum) < 1:
        raise WeDetectError("epochs, batch_size and grad_accum must be >= 1")
    model = ref.model
    params = trainable_parameters(ref, config.train_llm)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(samples) / (config.batch_size * config.grad_accum))
    total = steps_per_epoch * config.epochs
    warmup = math.ceil(total * config.warmup_ratio)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / (warmup + 1) if s < warmup else max(0.0, (total - s) / max(1, total - warmup))
    )
    rng = random.Random(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    model.train()
    model.model.visual.eval()
    losses: list[float] = []
    bar = tqdm(total=total, desc="WeDetect-Ref finetune", disable=not progress)
    try:
        for _ in range(config.epochs):
            order = list(samples)
            rng.shuffle(order)
            batches = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
            for start in range(0, len(batches), config.grad_accum):
                group = batches[start : start + config.grad_accum]
                step_loss = 0.0
                for batch in group:
                    loss = batch_loss(ref, batch, config, generator) / len(group)
                    loss.backward()
                    step_loss += loss.item()
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(step_loss)
                bar.set_postfix(loss=f"{step_loss:.4f}")
                bar.update(1)
    finally:
        bar.close()
        model.eval()
        model.requires_grad_(False)
    if output_dir is not None:
        ref.save_pretrained(output_dir)
    return losses
