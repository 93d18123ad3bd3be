"""Plain data records that cross module boundaries: letterbox metadata and detections."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class LetterboxMeta:
    """How one image was mapped into the square network input.

    ``scale`` is per axis (sf_w, sf_h) and ``pad`` is (top, bottom, left, right) in input pixels;
    a box in input pixels maps back as ``(x - left) / sf_w``, ``(y - top) / sf_h``.
    """

    orig_size: tuple[int, int]  # (h, w) of the decoded image
    input_size: int  # S of the S x S network input
    scale: tuple[float, float]  # (sf_w, sf_h)
    pad: tuple[float, float, float, float]  # (top, bottom, left, right)


@dataclass
class Detections:
    """Detections (or Uni proposals) of one image, boxes xyxy in original-image pixels.

    For WeDetect-Uni proposals, ``labels`` holds the objectness-prompt index that selected each
    box and ``embeddings`` (N, 768) the batch-normalised anchor embedding (not unit length);
    ``levels`` is the feature level (0, 1, 2 for strides 8, 16, 32) and ``logit_scale`` /
    ``logit_bias`` the per-level scalars (logit scale before exp) that the official score uses:
    ``sigmoid(exp(logit_scale) * (e . t) + logit_bias)`` for a unit-length text vector t.
    """

    boxes: torch.Tensor  # (N, 4) float32
    scores: torch.Tensor  # (N,) float32
    labels: torch.Tensor  # (N,) int64
    names: list[str] = field(default_factory=list)  # class name per box ('' for Uni)
    image_size: tuple[int, int] = (0, 0)  # (h, w)
    path: str | None = None
    embeddings: torch.Tensor | None = None
    levels: torch.Tensor | None = None
    logit_scale: torch.Tensor | None = None
    logit_bias: torch.Tensor | None = None
    error: str | None = None  # set (and the tensors empty) when the image could not be read

    @classmethod
    def failed(cls, path: str | None, error: str) -> "Detections":
        return cls(torch.zeros((0, 4)), torch.zeros(0), torch.zeros(0, dtype=torch.int64), path=path, error=error)

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def cpu(self) -> "Detections":
        def move(t: Any) -> Any:
            return t.cpu() if isinstance(t, torch.Tensor) else t

        return Detections(**{k: move(v) for k, v in self.__dict__.items()})

    def to_coco(self, image_id: int | str, category_ids: list[int] | None = None) -> list[dict]:
        """COCO results rows: ``image_id``, ``category_id``, ``bbox`` (x, y, w, h), ``score``.

        ``category_ids[label]`` maps a label to a dataset category id (default: the label itself).
        """
        rows = []
        for box, score, label in zip(self.boxes.tolist(), self.scores.tolist(), self.labels.tolist()):
            x1, y1, x2, y2 = box
            cat = category_ids[label] if category_ids is not None else label
            rows.append(
                {
                    "image_id": image_id,
                    "category_id": cat,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": score,
                }
            )
        return rows

    def to_dict(self) -> dict:
        """JSON-friendly dict (embeddings are left out)."""
        return {
            "path": self.path,
            "image_size": list(self.image_size),
            "boxes": self.boxes.tolist(),
            "scores": self.scores.tolist(),
            "labels": self.labels.tolist(),
            "names": list(self.names),
            **({"error": self.error} if self.error else {}),
        }
