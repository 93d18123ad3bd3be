"""Object retrieval with WeDetect-Uni proposal embeddings, as the official ``retrieval_metric.py``.

Image I is retrieved for class k iff max over its proposals p of
``sigmoid(exp(s_p) * <e_p, t_k> + b_p)`` (``scoring="wedetect"``) or ``sigmoid(<e_p, t_k>)``
(``scoring="raw"``, the official ``--model hqclip`` branch) is **strictly** above the threshold,
computed in float32. Per class with at least one relevant image: precision, recall and F1 on
image sets, each rounded to 4 decimals; the macro values are means of the rounded numbers.

Relevance: ``coco`` counts every annotation (crowd included); ``lvis`` keeps only annotations
with 0 < area < inf (the LVIS API's filter). Both are closed-world: an unannotated class is a
negative. Text row k is attributed to class name k (default: the annotation file's categories in
file order, which is how the official hard-coded English lists line up with the files).

``federated=True`` (not official, ``lvis`` only) scores precision the way the LVIS API treats a
detection of class k on image I, at image level. I is *positive* for k if it has an annotation of
k with 0 < area < inf; a retrieved positive is a true positive. Otherwise I is a *verified
negative* if k is in its ``neg_category_ids`` and not in its ``not_exhaustive_category_ids`` (LVIS
ignores unmatched detections of not-exhaustively annotated classes); a retrieved verified negative
is a false positive. Every other retrieved image (k unverified) is ignored: it counts in neither TP
nor FP, and the per-class ``ignored`` counts report how many. Recall and support are unchanged.
Both lists are required on every image, as the LVIS API requires them; ids of categories not in
the file are ignored, as LVIS does.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Mapping, Sequence

import numpy as np
import torch

from wedetect.errors import WeDetectError
from wedetect.eval.dataset import AnnotationError, CocoDataset, first_duplicate

Scoring = Literal["wedetect", "raw"]
RetrievalMode = Literal["coco", "lvis"]
DEFAULT_THRESHOLD = 0.3  # the official script's default (its README runs 0.2)


@dataclass
class ImageEmbeddings:
    """What WeDetect-Uni keeps per image for retrieval; boxes/scores are optional extras."""

    image_id: int
    embedding: torch.Tensor  # (N, D) float32, not normalised
    scale: torch.Tensor  # (N,) per-proposal logit scale, before exp
    bias: torch.Tensor  # (N,)
    boxes: torch.Tensor | None = None  # (N, 4) xyxy
    scores: torch.Tensor | None = None  # (N,)


@dataclass
class ClassRetrieval:
    precision: float
    recall: float
    f1: float
    support: int
    n_pred: int


@dataclass
class RetrievalResult:
    """Per-class rounded P/R/F1 and their macro means (official), plus unrounded macro means (extra).

    ``ignored`` is set only in federated mode: per class, the retrieved images left out of the
    precision because the class is unverified on them.
    """

    per_class: dict[str, ClassRetrieval]
    macro_precision: float
    macro_recall: float
    macro_f1: float
    unrounded_macro: dict[str, float] = field(default_factory=dict)
    ignored: dict[str, int] | None = None

    def table(self) -> str:
        width = max([len("Macro Avg"), *(len(name) for name in self.per_class)]) + 2
        lines = [f"{'Class':<{width}}{'Prec':<9}{'Recall':<9}{'F1':<9}{'Support':<9}{'Pred#':<8}"]
        # By F1 descending; ties by name (the official order among ties depends on string hashing).
        for name, c in sorted(self.per_class.items(), key=lambda item: (-item[1].f1, item[0])):
            lines.append(f"{name:<{width}}{c.precision:<9}{c.recall:<9}{c.f1:<9}{c.support:<9}{c.n_pred:<8}")
        lines.append(
            f"{'Macro Avg':<{width}}{self.macro_precision:<9.4f}{self.macro_recall:<9.4f}{self.macro_f1:<9.4f}"
        )
        if self.ignored is not None:
            lines.append(
                f"Federated precision: {sum(self.ignored.values())} retrieved (image, class) pairs with the "
                "class unverified on the image were ignored"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "per_class": {name: vars(c) for name, c in self.per_class.items()},
            "macro_precision": self.macro_precision,
            "macro_recall": self.macro_recall,
            "macro_f1": self.macro_f1,
            "unrounded_macro": self.unrounded_macro,
            **({} if self.ignored is None else {"federated": True, "ignored": self.ignored}),
        }


def image_class_scores(
    images: Sequence[ImageEmbeddings], text: torch.Tensor, scoring: Scoring = "wedetect"
) -> torch.Tensor:
    """(I, K) float32: per image and class, the maximum proposal score."""
    if scoring not in ("wedetect", "raw"):
        raise ValueError(f"scoring must be 'wedetect' or 'raw', not {scoring!r}")
    text = torch.as_tensor(text, dtype=torch.float32)
    rows = []
    for image in images:
        if len(image.embedding) == 0:
            raise AnnotationError(f"image {image.image_id} has no proposals: its retrieval score is undefined")
        emb = torch.as_tensor(image.embedding, dtype=torch.float32)
        if emb.shape[-1] != text.shape[-1]:
            raise AnnotationError(
                f"image {image.image_id}: embedding dim {emb.shape[-1]} differs from text dim {text.shape[-1]}"
            )
        logits = emb @ text.T
        if scoring == "wedetect":
            scale = torch.as_tensor(image.scale, dtype=torch.float32)
            bias = torch.as_tensor(image.bias, dtype=torch.float32)
            if scale.shape != (len(emb),) or bias.shape != (len(emb),):
                raise AnnotationError(
                    f"image {image.image_id}: no per-proposal scale/bias for 'wedetect' scoring (use 'raw')"
                )
            logits = logits * scale.exp()[:, None] + bias[:, None]
        rows.append(logits.sigmoid().amax(dim=0))
    return torch.stack(rows) if rows else torch.zeros((0, len(text)), dtype=torch.float32)


def retrieve(
    images: Sequence[ImageEmbeddings],
    text: torch.Tensor,
    class_names: Sequence[str],
    *,
    threshold: float = DEFAULT_THRESHOLD,
    scoring: Scoring = "wedetect",
    skip_empty: bool = False,
) -> dict[str, set[int]]:
    """Class name -> ids of the images retrieved for it (score strictly above ``threshold``).

    Images without proposals stop the run (the official script crashes on them) unless
    ``skip_empty``, which lets them retrieve nothing.
    """
    if len(text) != len(class_names):
        raise AnnotationError(f"{len(text)} text embeddings but {len(class_names)} class names; they must match")
    dup = first_duplicate(image.image_id for image in images)
    if dup is not None:
        raise AnnotationError(f"image {dup} appears twice in the embeddings")
    if skip_empty:
        images = [image for image in images if len(image.embedding)]
    scores = image_class_scores(images, text, scoring)
    hits = scores > torch.tensor(threshold, dtype=torch.float32)  # the official compares in float32
    ids = [image.image_id for image in images]
    predicted: dict[str, set[int]] = {}
    for k, name in enumerate(class_names):
        predicted.setdefault(name, set()).update(ids[i] for i in hits[:, k].nonzero().flatten().tolist())
    return predicted


def retrieval_ground_truth(dataset: CocoDataset, mode: RetrievalMode = "coco") -> dict[str, set[int]]:
    """Category name -> relevant image ids (names with no relevant image are absent)."""
    if mode not in ("coco", "lvis"):
        raise ValueError(f"retrieval mode must be 'coco' or 'lvis', not {mode!r}")
    names = {cat["id"]: cat["name"] for cat in dataset.categories}
    relevant: dict[str, set[int]] = {}
    for ann in dataset.annotations:
        if mode == "lvis" and not 0 < ann.get("area", 0) < float("inf"):
            continue
        relevant.setdefault(names[ann["category_id"]], set()).add(ann["image_id"])
    return relevant


def verified_negatives(dataset: CocoDataset) -> dict[str, set[int]]:
    """Category name -> images where LVIS counts a detection of it as a false positive when unmatched.

    That is: the category is in the image's ``neg_category_ids`` and not in its
    ``not_exhaustive_category_ids`` (images positive for the category are excluded by the caller).
    """
    names = {cat["id"]: cat["name"] for cat in dataset.categories}
    negatives: dict[str, set[int]] = {}
    for image in dataset.images:
        lists = {}
        for key in ("neg_category_ids", "not_exhaustive_category_ids"):
            if not isinstance(image.get(key), list):
                raise AnnotationError(f"federated retrieval: image {image['id']} lacks the '{key}' list")
            lists[key] = set(image[key])
        for cat_id in lists["neg_category_ids"] - lists["not_exhaustive_category_ids"]:
            if cat_id in names:  # unknown ids are ignored, as the LVIS API does
                negatives.setdefault(names[cat_id], set()).add(image["id"])
    return negatives


def evaluate_retrieval(
    predicted: Mapping[str, Iterable[int]],
    ground_truth: Mapping[str, set[int]],
    negatives: Mapping[str, set[int]] | None = None,
) -> RetrievalResult:
    """Per-class and macro P/R/F1 over the classes that have relevant images.

    With ``negatives`` (federated mode, see :func:`verified_negatives`) a retrieved non-relevant
    image is a false positive only if it is a verified negative of the class; others are ignored.
    """
    per_class: dict[str, ClassRetrieval] = {}
    ignored: dict[str, int] = {}
    unrounded = []
    for name, relevant in ground_truth.items():
        pred = set(predicted.get(name, ()))
        tp, fp, fn = len(pred & relevant), len(pred - relevant), len(relevant - pred)
        if negatives is not None:
            fp = len((pred - relevant) & negatives.get(name, set()))
            ignored[name] = len(pred - relevant) - fp
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * p * r / (p + r) if p + r else 0.0  # from the unrounded P and R, as official
        unrounded.append((p, r, f1))
        per_class[name] = ClassRetrieval(round(p, 4), round(r, 4), round(f1, 4), len(relevant), len(pred))
    if not per_class:
        raise AnnotationError("no category has a relevant image: retrieval metrics are undefined")
    macro = [float(np.mean([getattr(c, key) for c in per_class.values()])) for key in ("precision", "recall", "f1")]
    raw = np.mean(np.asarray(unrounded), axis=0).tolist()
    return RetrievalResult(
        per_class,
        *macro,
        unrounded_macro={"precision": raw[0], "recall": raw[1], "f1": raw[2]},
        ignored=None if negatives is None else ignored,
    )


def evaluate_object_retrieval(
    dataset: CocoDataset | str | Path,
    images: Sequence[ImageEmbeddings],
    text: torch.Tensor,
    *,
    mode: RetrievalMode = "coco",
    threshold: float = DEFAULT_THRESHOLD,
    scoring: Scoring = "wedetect",
    class_names: Sequence[str] | None = None,
    skip_empty: bool = False,
    federated: bool = False,
) -> tuple[RetrievalResult, dict[str, set[int]]]:
    """The official retrieval benchmark: returns the metric and the retrieved image sets.

    ``federated`` (``lvis`` mode only, not official) ignores retrieved images on which the class is
    unverified when computing precision (see the module docstring for the exact rules).
    """
    if federated and mode != "lvis":
        raise WeDetectError("federated retrieval needs LVIS-style relevance (mode 'lvis')")
    dataset = dataset if isinstance(dataset, CocoDataset) else CocoDataset.load(dataset)
    class_names = list(class_names) if class_names is not None else dataset.category_names
    known = set(dataset.image_ids)
    got = {image.image_id for image in images}
    if got - known:
        raise AnnotationError(f"embeddings for image id(s) not in the dataset, e.g. {sorted(got - known)[:5]}")
    if known - got:
        raise AnnotationError(f"no embeddings for {len(known - got)} dataset image(s), e.g. {sorted(known - got)[:5]}")
    negatives = verified_negatives(dataset) if federated else None
    predicted = retrieve(images, text, class_names, threshold=threshold, scoring=scoring, skip_empty=skip_empty)
    return evaluate_retrieval(predicted, retrieval_ground_truth(dataset, mode), negatives), predicted


def save_embeddings(
    path: str | Path, images: Sequence[ImageEmbeddings], text: torch.Tensor | None = None
) -> None:
    """Write embeddings as concatenated arrays with per-image ``counts`` (npz)."""
    def cat(key: str, shape: tuple[int, ...]) -> np.ndarray | None:
        parts = [getattr(image, key) for image in images]
        if any(part is None for part in parts):
            return None
        if not parts:
            return np.zeros((0, *shape), np.float32)
        return np.concatenate([torch.as_tensor(p).float().reshape(-1, *shape).numpy() for p in parts])

    dim = images[0].embedding.shape[-1] if images else (0 if text is None else text.shape[-1])
    arrays = {
        "image_ids": np.asarray([image.image_id for image in images], dtype=np.int64),
        "counts": np.asarray([len(image.embedding) for image in images], dtype=np.int64),
        "embedding": cat("embedding", (dim,)),
        "scale": cat("scale", ()),
        "bias": cat("bias", ()),
        "boxes": cat("boxes", (4,)),
        "scores": cat("scores", ()),
    }
    if text is not None:
        arrays["text_embedding"] = torch.as_tensor(text).float().numpy()
    np.savez_compressed(path, **{k: v for k, v in arrays.items() if v is not None})


def load_embeddings(path: str | Path) -> tuple[list[ImageEmbeddings], torch.Tensor | None]:
    """Read embeddings from our npz layout or from the official ``{dataset}_{model}.pth``.

    The official file is ``{"image_embedding": [{"image_id", "embedding", "scale", "bias"}, ...],
    "text_embedding": (K, D)}``; ``scale``/``bias`` may be absent for raw-scoring baselines.
    """
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"embeddings file not found: {path}")
    if path.suffix == ".npz":
        with np.load(path) as data:
            arrays = {key: data[key] for key in data.files}
        for key in ("image_ids", "counts", "embedding"):
            if key not in arrays:
                raise AnnotationError(f"{path}: missing array {key!r}")
        if int(arrays["counts"].sum()) != len(arrays["embedding"]):
            raise AnnotationError(f"{path}: counts do not add up to the number of embeddings")
        bounds = np.cumsum(arrays["counts"])[:-1]
        keys = ("embedding", "scale", "bias", "boxes", "scores")
        split = {k: np.split(arrays[k], bounds) for k in keys if k in arrays}
        images = [
            ImageEmbeddings(
                image_id=int(image_id),
                embedding=torch.from_numpy(split["embedding"][i]),
                scale=torch.from_numpy(split["scale"][i]) if "scale" in split else torch.zeros(0),
                bias=torch.from_numpy(split["bias"][i]) if "bias" in split else torch.zeros(0),
                boxes=torch.from_numpy(split["boxes"][i]) if "boxes" in split else None,
                scores=torch.from_numpy(split["scores"][i]) if "scores" in split else None,
            )
            for i, image_id in enumerate(arrays["image_ids"].tolist())
        ]
        text = torch.from_numpy(arrays["text_embedding"]) if "text_embedding" in arrays else None
        return images, text
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or "image_embedding" not in payload:
        raise AnnotationError(f"{path}: expected the official dict with 'image_embedding' and 'text_embedding'")
    images = [
        ImageEmbeddings(
            image_id=int(entry["image_id"]),
            embedding=torch.as_tensor(entry["embedding"]).float(),
            scale=torch.as_tensor(entry.get("scale", torch.zeros(0))).float().flatten(),
            bias=torch.as_tensor(entry.get("bias", torch.zeros(0))).float().flatten(),
        )
        for entry in payload["image_embedding"]
    ]
    text = payload.get("text_embedding")
    return images, None if text is None else torch.as_tensor(text).float()
