"""WeDetect-Ref pipeline: image -> WeDetect-Uni proposals -> one Qwen3-VL pass per query -> box scores.

>>> ref = WeDetectRef.from_pretrained("WeDetect-Ref-2B", uni="wedetect_uni_base.pth", device="cuda",
...                                   dtype="bfloat16")
>>> [det] = ref.predict(["kitchen.jpg"], "the mug left of the kettle")        # top-1 box
>>> dets = ref.predict(["kitchen.jpg"], ["mug", "kettle"], threshold=0.3)    # per image, per query

The image is resized the way the official code does (32-pixel grid, 900-1600 visual tokens), the
vision tower runs once per image, and every query on that image reuses those features and the
proposals. Returned boxes are the proposals in full float32 precision (the official code returns
them rounded through bf16).
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from wedetect.data.io import ImageInput, load_pil_rgb
from wedetect.errors import WeDetectError
from wedetect.inference import resolve_device, resolve_dtype
from wedetect.models.ref import (
    OBJECT_TOKEN,
    RefInputError,
    RefVisionFeatures,
    WeDetectRefForProposalScoring,
    load_ref_model,
    save_ref_model,
)
from wedetect.structures import Detections

QUERY_TEMPLATE = 'Please detect the "{query}" in the image'
CAPTION_TEMPLATE = 'Please detect the "{query}" described in the caption "{caption}" in the image'
# Visual-token budget of the official resize (upstream qwen-vl-utils uses 4 / 16384).
MIN_VISUAL_TOKENS = 900
MAX_VISUAL_TOKENS = 1600
MAX_ASPECT_RATIO = 200
# The official script keeps the top 100 Uni proposals, and the model was trained with 100 per image.
NUM_PROPOSALS = 100


class NoProposalsError(WeDetectError):
    """WeDetect-Uni found no proposal in an image, so there is nothing to score."""


class Proposer(Protocol):
    """Anything that proposes boxes like ``WeDetectUni.propose``."""

    def propose(self, images: Sequence[Any], num_proposals: int = ..., **kwargs: Any) -> list[Detections]: ...


def smart_resize(
    height: int,
    width: int,
    factor: int = 32,
    min_pixels: int = MIN_VISUAL_TOKENS * 32 * 32,
    max_pixels: int = MAX_VISUAL_TOKENS * 32 * 32,
) -> tuple[int, int]:
    """Size (h, w), multiples of ``factor``, closest to the input within the pixel budget.

    Small images are upscaled to at least ``min_pixels`` (e.g. 640x480 -> 1120x832).
    """
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise WeDetectError(f"image aspect ratio above {MAX_ASPECT_RATIO}: {width}x{height}")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = math.floor(height / beta / factor) * factor
        w = math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def as_boxes(boxes: Any) -> Tensor:
    """Validate proposals: an (N, 4) xyxy float array, finite, with x2 >= x1 and y2 >= y1."""
    try:
        t = boxes.detach() if isinstance(boxes, Tensor) else torch.from_numpy(np.asarray(boxes, dtype=np.float32))
    except (TypeError, ValueError) as e:
        raise RefInputError(f"boxes must be an (N, 4) array of numbers: {e}") from None
    t = t.to("cpu", torch.float32)
    if t.ndim == 1 and t.numel() == 0:
        t = t.reshape(0, 4)
    if t.ndim != 2 or t.shape[1] != 4:
        raise RefInputError(f"boxes must have shape (N, 4) xyxy, got {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise RefInputError("boxes contain NaN or infinite coordinates")
    if (t[:, 2] < t[:, 0]).any() or (t[:, 3] < t[:, 1]).any():
        raise RefInputError("boxes must be xyxy with x2 >= x1 and y2 >= y1")
    return t


def check_query(query: Any) -> str:
    if not isinstance(query, str) or not query.strip():
        raise WeDetectError(f"the query must be a non-empty expression, got {query!r}")
    return query


@dataclass
class RefImage:
    """One decoded image, ready for scoring: its resized pixels, vision features and proposals."""

    image: Image.Image  # original, RGB
    path: str | None
    resized: Image.Image
    pixel_values: Tensor
    image_grid_thw: Tensor  # (1, 3)
    features: RefVisionFeatures | None = None
    proposals: Tensor | None = None  # (N, 4) float32, original pixels

    @property
    def original_wh(self) -> tuple[int, int]:
        return self.image.size


class WeDetectRef:
    """WeDetect-Ref referring-expression detection over WeDetect-Uni proposals.

    Args:
        model: the loaded ``WeDetectRefForProposalScoring``.
        processor: its Qwen3-VL processor (tokenizer with ``<object>``, image processor, template).
        uni: a proposal source with ``propose`` (``WeDetectUni``); optional when boxes are given.
        num_proposals: how many Uni proposals to score per image (official: 100).
        max_proposals: most ``<object>`` tokens accepted in one prompt (the model saw 100).
        min_visual_tokens, max_visual_tokens: token budget of the resize (official: 900 / 1600).
    """

    def __init__(
        self,
        model: WeDetectRefForProposalScoring,
        processor: Any,
        uni: Proposer | None = None,
        num_proposals: int = NUM_PROPOSALS,
        max_proposals: int = NUM_PROPOSALS,
        min_visual_tokens: int = MIN_VISUAL_TOKENS,
        max_visual_tokens: int = MAX_VISUAL_TOKENS,
    ):
        if not 0 < min_visual_tokens <= max_visual_tokens:
            raise WeDetectError(
                f"need 0 < min_visual_tokens <= max_visual_tokens, got {min_visual_tokens}, {max_visual_tokens}"
            )
        self.model = model
        self.processor = processor
        self.uni = uni
        self.num_proposals = num_proposals
        self.max_proposals = max_proposals
        self.min_visual_tokens = min_visual_tokens
        self.max_visual_tokens = max_visual_tokens
        vision = model.config.vision_config
        self.merge_size = vision.spatial_merge_size
        self.resize_factor = vision.patch_size * vision.spatial_merge_size
        self.image_token = processor.image_token
        self.pad_token_id = processor.tokenizer.pad_token_id or 0

    # --------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls,
        ref_dir: str | Path,
        uni: str | Path | Proposer | None = None,
        device: str | torch.device | None = "cpu",
        dtype: str | torch.dtype = "float32",
        attn_implementation: str | None = None,
        uni_dtype: str | torch.dtype = "float32",
        **kwargs: Any,
    ) -> "WeDetectRef":
        """Load an official-layout WeDetect-Ref folder (and optionally a WeDetect-Uni checkpoint path
        or an already built proposer). ``device="auto"`` picks CUDA when available. Attention:
        flash-attention 2 when installed (CUDA, half precision), else SDPA.

        ``dtype`` is the Qwen3-VL model's; a WeDetect-Uni loaded from a path runs in ``uni_dtype``, float32
        as in the official demo whatever ``dtype`` is (a bf16 Uni proposes a different set of boxes)."""
        from transformers import AutoProcessor

        ref_dir = Path(ref_dir)
        if ref_dir.is_file():
            raise WeDetectError(f"WeDetect-Ref checkpoint {ref_dir} is a file: give the Hugging Face-layout folder "
                                "(config.json, weights, tokenizer) of a WeDetect-Ref model")
        if not ref_dir.is_dir():
            raise WeDetectError(f"WeDetect-Ref checkpoint folder not found: {ref_dir}")
        try:
            processor = AutoProcessor.from_pretrained(ref_dir)
        except (OSError, ValueError, TypeError) as e:
            raise WeDetectError(f"cannot load the processor/tokenizer from {ref_dir}: {e}") from e
        device = resolve_device(device)
        model = load_ref_model(ref_dir, processor.tokenizer, device, resolve_dtype(dtype), attn_implementation)
        if isinstance(uni, (str, os.PathLike)):
            from wedetect import WeDetectUni

            uni = WeDetectUni.from_pretrained(uni, device=device, dtype=uni_dtype)
        return cls(model, processor, uni=uni, **kwargs)

    def save_pretrained(self, folder: str | Path) -> None:
        """Write weights, config, tokenizer and processor in the official folder layout."""
        save_ref_model(self.model, folder)
        self.processor.save_pretrained(folder)

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ----------------------------------------------------------------------------- preparation
    def prepare(self, image: ImageInput | RefImage) -> RefImage:
        """Decode and resize an image and run the image processor (no model call)."""
        if isinstance(image, RefImage):
            return image
        # Decoded as the official demo does (Pillow, RGB, no EXIF rotation); Uni gets the same pixels.
        rgb = load_pil_rgb(image)
        path = str(image) if isinstance(image, (str, os.PathLike)) else None
        w0, h0 = rgb.size
        f = self.resize_factor
        h, w = smart_resize(h0, w0, f, self.min_visual_tokens * f * f, self.max_visual_tokens * f * f)
        resized = rgb.resize((w, h), Image.Resampling.BICUBIC)  # the official (PIL default) filter
        inputs = self.processor.image_processor(images=[resized], do_resize=False, return_tensors="pt")
        return RefImage(rgb, path, resized, inputs["pixel_values"], inputs["image_grid_thw"])

    def encode(self, image: ImageInput | RefImage, boxes: Any | None = None) -> RefImage:
        """Prepare an image, run the vision tower once and attach proposals (given ``boxes`` or Uni's)."""
        ref_image = self.prepare(image)
        if boxes is not None:
            ref_image.proposals = as_boxes(boxes)
        elif ref_image.proposals is None:
            ref_image.proposals = self.propose([ref_image])[0]
        self._check_proposals(ref_image)
        if ref_image.features is None:
            with torch.inference_mode():
                ref_image.features = self.model.encode_images(
                    ref_image.pixel_values.to(self.device, self.model.dtype), ref_image.image_grid_thw.to(self.device)
                )[0]
        return ref_image

    def propose(self, images: Sequence[RefImage]) -> list[Tensor]:
        """Top ``num_proposals`` WeDetect-Uni boxes of each image (original pixels, Uni order)."""
        if self.uni is None:
            raise WeDetectError("no WeDetect-Uni model to propose boxes: pass uni=... or give boxes explicitly")
        dets = self.uni.propose([im.image for im in images], num_proposals=self.num_proposals, score_threshold=0.0)
        return [as_boxes(d.boxes[: self.num_proposals]) for d in dets]

    def prompt(self, query: str, num_boxes: int, caption: str | None = None) -> str:
        """The chat-template text: user = image + instruction, assistant = ``<object>`` x N."""
        query = check_query(query)
        text = QUERY_TEMPLATE.format(query=query) if caption is None else CAPTION_TEMPLATE.format(
            query=query, caption=caption
        )
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]},
            {"role": "assistant", "content": [{"type": "text", "text": OBJECT_TOKEN * num_boxes}]},
        ]
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)

    def tokenize(self, prompts: Sequence[str], num_image_tokens: int, num_boxes: int) -> tuple[Tensor, Tensor]:
        """Token ids (right padded) and attention mask; checks one image and N ``<object>`` per prompt."""
        object_id = self.model.object_token_id
        image_id = self.model.config.image_token_id
        rows = []
        for text in prompts:
            if text.count(self.image_token) != 1:
                raise RefInputError(f"the prompt must hold exactly one {self.image_token}: {text!r}")
            expanded = text.replace(self.image_token, self.image_token * num_image_tokens)
            ids = self.processor.tokenizer(expanded)["input_ids"]  # as the processor tokenizes
            if ids.count(object_id) != num_boxes or ids.count(image_id) != num_image_tokens:
                raise RefInputError(
                    f"the query may not contain special tokens such as {OBJECT_TOKEN}: the prompt holds "
                    f"{ids.count(object_id)} {OBJECT_TOKEN} tokens for {num_boxes} boxes"
                )
            rows.append(ids)
        length = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return input_ids, mask

    def _check_proposals(self, ref_image: RefImage) -> None:
        boxes = ref_image.proposals
        name = ref_image.path or "the image"
        if boxes is None or len(boxes) == 0:
            raise NoProposalsError(f"no proposals for {name}: nothing to score")
        if len(boxes) > self.max_proposals:
            raise RefInputError(
                f"{len(boxes)} proposals for {name}, but WeDetect-Ref takes at most {self.max_proposals} "
                f"{OBJECT_TOKEN} tokens per prompt (the official setting); pass fewer boxes or raise max_proposals"
            )

    # ---------------------------------------------------------------------------------- scoring
    @torch.inference_mode()
    def score_queries(
        self,
        image: ImageInput | RefImage,
        queries: Sequence[str],
        boxes: Any | None = None,
        query_batch_size: int = 8,
    ) -> Tensor:
        """Scores ``(Q, N)`` in [0, 1] of the N proposals for each query; the image is encoded once.

        ``boxes`` (N, 4) xyxy in original pixels overrides the Uni proposals.
        """
        if isinstance(queries, str) or not len(queries):
            raise WeDetectError("score_queries takes a non-empty list of queries")
        ref_image = self.encode(image, boxes)
        proposals = ref_image.proposals
        prompts = [self.prompt(q, len(proposals)) for q in queries]
        num_image_tokens = int(ref_image.image_grid_thw[0].prod()) // self.merge_size**2
        device = self.device
        scores = []
        for start in range(0, len(prompts), query_batch_size):
            chunk = prompts[start : start + query_batch_size]
            input_ids, mask = self.tokenize(chunk, num_image_tokens, len(proposals))
            out = self.model(
                input_ids.to(device),
                boxes=[proposals.to(device)] * len(chunk),
                original_sizes=[ref_image.original_wh] * len(chunk),
                attention_mask=mask.to(device),
                vision_features=[ref_image.features] * len(chunk),
            )
            scores.extend(logits.sigmoid().cpu() for logits in out.proposal_logits)
        return torch.stack(scores)

    def score(self, image: ImageInput | RefImage, query: str, boxes: Any | None = None) -> Tensor:
        """Scores ``(N,)`` in [0, 1] of the proposals (or the given boxes) for one expression."""
        return self.score_queries(image, [check_query(query)], boxes)[0]

    def predict(
        self,
        images: ImageInput | RefImage | Sequence[ImageInput | RefImage],
        queries: str | Sequence[str],
        threshold: float | None = None,
        boxes: Sequence[Any] | None = None,
        batch_size: int = 8,
        progress: bool = False,
    ) -> list[Detections] | list[list[Detections]]:
        """Detect what each expression refers to, in every image.

        Per image and query: the single best proposal (default, or a negative ``threshold``: the official
        demo's ``--score_thre -1``), or with ``threshold >= 0`` every proposal scoring strictly above it,
        in proposal order (possibly none).
        ``labels`` hold the query index and ``names`` the query. ``boxes`` gives per-image proposals
        instead of WeDetect-Uni's. Returns a list per image of Detections for a single query string,
        of lists (one per query) for a list of queries.
        """
        single_query = isinstance(queries, str)
        query_list = [queries] if single_query else list(queries)
        if not query_list:
            raise WeDetectError("predict needs at least one query")
        self.check_queries(query_list)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise WeDetectError(f"batch_size must be a positive integer, not {batch_size!r}")
        if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray, RefImage, bytes, Tensor)):
            images = [images]
        images = list(images)
        if boxes is not None and len(boxes) != len(images):
            raise WeDetectError(f"got {len(boxes)} box sets for {len(images)} images")
        results: list[list[Detections]] = []
        bar = tqdm(total=len(images), desc="WeDetect-Ref", disable=not progress)
        for start in range(0, len(images), batch_size):
            given = images[start : start + batch_size]
            chunk = [self.prepare(im) for im in given]
            if boxes is None:
                pending = [im for im in chunk if im.proposals is None]
                for im, props in zip(pending, self.propose(pending) if pending else []):
                    im.proposals = props
            else:
                for im, b in zip(chunk, boxes[start : start + batch_size]):
                    im.proposals = as_boxes(b)
            for original, im in zip(given, chunk):
                scores = self.score_queries(im, query_list)
                results.append(
                    [self._select(im, q, i, s, threshold) for i, (q, s) in enumerate(zip(query_list, scores))]
                )
                if not isinstance(original, RefImage):
                    im.features = None  # free the vision features once all queries of the image are done
                bar.update(1)
        bar.close()
        return [r[0] for r in results] if single_query else results

    def check_queries(self, queries: Sequence[str]) -> None:
        """Refuse empty expressions and ones holding the model's special tokens (``<object>``, image tokens),
        which would break the prompt's one-``<object>``-per-box layout."""
        tokenizer = self.processor.tokenizer
        special = set(tokenizer.all_special_ids) | {self.model.object_token_id, self.model.config.image_token_id}
        for q in queries:
            check_query(q)
            if special & set(tokenizer(q, add_special_tokens=False)["input_ids"]):
                raise RefInputError(f"the query {q!r} contains special tokens such as {OBJECT_TOKEN}")

    @staticmethod
    def _select(ref_image: RefImage, query: str, label: int, scores: Tensor, threshold: float | None) -> Detections:
        if threshold is None or threshold < 0:
            keep = scores.argmax().reshape(1)
        else:
            keep = torch.nonzero(scores > threshold).flatten()
        w, h = ref_image.original_wh
        return Detections(
            boxes=ref_image.proposals[keep].clone(),
            scores=scores[keep].float(),
            labels=torch.full((len(keep),), label, dtype=torch.long),
            names=[query] * len(keep),
            image_size=(h, w),
            path=ref_image.path,
        )
