"""Text search over an object index, and the high-level :class:`ObjectIndex` API.

Scores are the official WeDetect-Uni retrieval probabilities
``sigmoid(exp(s_l) * (e . t) + b_l)``; ``min_score`` keeps objects whose score is strictly
greater, like the official retrieval decision. Query texts are embedded by the WeDetect text
tower (``WeDetect.encode_text``) and cached on disk per checkpoint, so repeated queries do not
load the model at all.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
import torch

from wedetect.errors import WeDetectError
from wedetect.index.build import build_index
from wedetect.index.store import (
    ObjectHit,
    ObjectIndexError,
    RawHits,
    VectorStore,
    open_store,
    probability,
    query_vectors,
)

# Per-image ANN search first fetches this many proposals per wanted image, then doubles.
_PER_IMAGE_OVERFETCH = 8


class TextEncoder(Protocol):
    def encode_text(self, texts: list[str]) -> torch.Tensor: ...


@dataclass
class QueryResult:
    """Ranked objects (or images, each with its best object) for one text query."""

    query: str
    hits: list[ObjectHit]

    def to_dict(self) -> dict:
        return {"query": self.query, "hits": [h.to_dict() for h in self.hits]}


def default_cache_dir() -> Path:
    root = os.environ.get("WEDETECT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "wedetect"
    )
    return Path(root) / "text_embeddings"


class CachedTextEncoder:
    """Text embeddings from a WeDetect checkpoint's text tower, cached on disk per checkpoint.

    The cache key is the checkpoint and tokenizer (path, size, mtime): a changed checkpoint
    never reuses stale vectors. ``loader`` builds the encoder on the first cache miss.
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike,
        tokenizer: str | os.PathLike | None,
        *,
        loader: Callable[[], TextEncoder],
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        ident = []
        for p in (checkpoint, tokenizer):
            path = Path(p).expanduser().resolve() if p is not None else None
            if path is not None and path.exists():
                st = path.stat()
                ident.append(f"{path}|{st.st_size}|{st.st_mtime_ns}")
            else:  # not a local file (default tokenizer, hub name): identified by name
                ident.append(str(p))
        key = hashlib.sha256("\n".join(ident).encode()).hexdigest()[:32]
        self.cache_file = Path(cache_dir or default_cache_dir()) / f"{key}.npz"
        self._loader = loader
        self._encoder: TextEncoder | None = None
        self._cache: dict[str, np.ndarray] = self._read()
        self.model_loaded = False

    def _read(self) -> dict[str, np.ndarray]:
        if not self.cache_file.is_file():
            return {}
        try:
            with np.load(self.cache_file, allow_pickle=False) as z:
                return dict(zip(z["texts"].tolist(), z["embeddings"]))
        except (OSError, ValueError, KeyError):
            return {}  # a damaged cache is only a cache: recompute

    def _write(self) -> None:
        try:
            self.cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.cache_file.with_suffix(f".tmp{os.getpid()}.npz")
            texts = list(self._cache)
            np.savez(tmp, texts=np.array(texts, dtype=np.str_), embeddings=np.stack([self._cache[t] for t in texts]))
            os.replace(tmp, self.cache_file)
        except OSError:
            pass  # read-only or full cache folder: searching still works, only slower next time

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if missing:
            if self._encoder is None:
                self._encoder = self._loader()
                self.model_loaded = True
            emb = self._encoder.encode_text(missing).detach().float().cpu().numpy()
            self._cache.update(zip(missing, emb))
            self._write()
        return torch.from_numpy(np.stack([self._cache[t] for t in texts]))


def wedetect_text_encoder(
    checkpoint: str | os.PathLike,
    tokenizer: str | os.PathLike | None,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    cache_dir: str | os.PathLike | None = None,
) -> CachedTextEncoder:
    """A cached text encoder over ``WeDetect.from_pretrained(checkpoint, tokenizer=...)``."""

    def load() -> TextEncoder:
        from wedetect import WeDetect

        return WeDetect.from_pretrained(str(checkpoint), tokenizer=tokenizer, device=device, dtype=dtype)

    return CachedTextEncoder(checkpoint, tokenizer, loader=load, cache_dir=cache_dir)


def _clean_queries(queries: str | Sequence[str]) -> list[str]:
    items = [queries] if isinstance(queries, str) else list(queries)
    if not items:
        raise WeDetectError("no query text given")
    for q in items:
        if not isinstance(q, str) or not q.strip():
            raise WeDetectError("a query text is empty")
    return items


class ObjectIndex:
    """A persistent index of WeDetect-Uni proposals, searchable by text.

    >>> index = ObjectIndex.open("photos.index")                           # doctest: +SKIP
    >>> index.search(["狗", "red car"], encoder, top_k=20, per_image=True)  # doctest: +SKIP
    """

    def __init__(self, store: VectorStore) -> None:
        self.store = store

    @classmethod
    def open(cls, location: str | os.PathLike, *, backend: str = "auto", device: str = "cpu") -> "ObjectIndex":
        return cls(open_store(location, backend=backend, device=device))

    # Extract and store proposals of images: the same function as ``build_index``.
    add = staticmethod(build_index)

    def info(self) -> dict:
        records = self.store.images()
        failed = [r for r in records if r.status == "failed"]
        return {
            "location": getattr(self.store, "location", ""),
            "backend": type(self.store).__name__,
            "images": len(records) - len(failed),
            "failed": [{"path": r.path, "reason": r.error} for r in failed],
            "proposals": self.store.count_proposals(),
            "embed_dim": self.store.meta.embed_dim,
            "vector_dim": self.store.meta.vector_dim,
            "model": self.store.meta.model,
            "ann_index": self.store.ann_index_type(),  # None: searches are exact
            "ann_index_details": self.store.ann_index_details(),
        }

    def build_ann_index(self, **params) -> dict:
        return self.store.build_ann_index(**params)

    def search(
        self,
        queries: str | Sequence[str],
        encoder: TextEncoder,
        *,
        top_k: int = 20,
        min_score: float | None = None,
        per_image: bool = False,
        exact: bool | None = None,
        **ann,
    ) -> list[QueryResult]:
        """Top objects (or, with ``per_image``, images ranked by their best object) per query."""
        texts = _clean_queries(queries)
        emb = encoder.encode_text(texts)
        hits = self.search_embeddings(emb, top_k=top_k, min_score=min_score, per_image=per_image, exact=exact, **ann)
        return [QueryResult(t, h) for t, h in zip(texts, hits)]

    def search_embeddings(
        self,
        text_embeddings: torch.Tensor | np.ndarray,
        *,
        top_k: int = 20,
        min_score: float | None = None,
        per_image: bool = False,
        exact: bool | None = None,
        **ann,
    ) -> list[list[ObjectHit]]:
        """Like :meth:`search` for L2-normalised text embeddings (Q, embed_dim)."""
        if top_k < 1:
            raise WeDetectError(f"--top-k must be positive, got {top_k}")
        if min_score is not None and not 0.0 <= min_score < 1.0:
            raise WeDetectError(f"--min-score must be in [0, 1), got {min_score}")
        emb = torch.as_tensor(text_embeddings)
        emb = emb[None] if emb.ndim == 1 else emb
        meta = self.store.meta
        if emb.shape[-1] != meta.embed_dim:
            raise ObjectIndexError(
                f"text embeddings are {emb.shape[-1]}-d but the index holds {meta.embed_dim}-d proposal embeddings; "
                "use the text tower that matches the index's Uni checkpoint"
            )
        q = query_vectors(emb, meta.vector_dim)
        if per_image:
            raw = self._search_images(q, top_k, exact, ann)
        else:
            raw = self.store.search(q, top_k, exact=exact, **ann)
        return [self._hits(r, top_k, min_score, per_image) for r in raw]

    def _search_images(self, q: np.ndarray, top_k: int, exact: bool | None, ann: dict) -> list[RawHits]:
        """Proposals enough to hold the best object of the top-k images of each query.

        The top ``(k-1) * M + 1`` proposals (M = most proposals of any image) always contain the
        best proposal of each of the k best images, so exact search fetches exactly that many;
        ANN search over-fetches and doubles until k distinct images are found.
        """
        bound = max(1, (top_k - 1) * self.store.max_proposals_per_image() + 1)
        use_exact = exact or (exact is None and not self.store.has_ann_index())
        if use_exact:
            return self.store.search(q, bound, exact=True)
        out = []
        for row in q:
            limit = min(bound, top_k * _PER_IMAGE_OVERFETCH)
            while True:
                (r,) = self.store.search(row[None], limit, exact=False, **ann)
                if np.unique(r.proposals.image_id).size >= top_k or limit >= bound or len(r.logits) < limit:
                    break
                limit = min(bound, limit * 2)
            out.append(r)
        return out

    def _hits(self, raw: RawHits, top_k: int, min_score: float | None, per_image: bool) -> list[ObjectHit]:
        p = raw.proposals
        scores = probability(raw.logits)
        keep = np.ones(len(scores), dtype=bool) if min_score is None else scores > np.float32(min_score)
        idx = np.flatnonzero(keep)
        if per_image:
            # Rows are sorted by logit, so the first row of an image is its best object.
            _, first = np.unique(p.image_id[idx], return_index=True)
            idx = idx[np.sort(first)]
        idx = idx[:top_k]
        records = self.store.image_records(p.image_id[idx].tolist())
        hits = []
        for i in idx:
            rec = records.get(int(p.image_id[i]))
            if rec is None:
                continue  # proposals of an image whose commit did not finish: not part of the index
            hits.append(
                ObjectHit(
                    image_id=int(p.image_id[i]),
                    path=rec.path,
                    box=[float(x) for x in p.box[i]],
                    score=float(scores[i]),
                    logit=float(raw.logits[i]),
                    proposal_score=float(p.score[i]),
                    level=int(p.level[i]),
                    image_size=(rec.height, rec.width),
                )
            )
        return hits


def _slug(text: str, max_len: int = 40) -> str:
    s = re.sub(r"[^\w\-]+", "_", text, flags=re.UNICODE).strip("_")
    return s[:max_len] or "query"


def save_visuals(results: Sequence[QueryResult], output_dir: str | os.PathLike, *, annotate: bool) -> list[Path]:
    """Write one crop per hit (``annotate=False``) or the whole image with the box drawn.

    Files go to ``output_dir/<query index>_<query>/<rank>_<image stem>_<score>.jpg``.
    Images that can no longer be read are skipped (the index does not need them).
    """
    from PIL import ImageDraw

    from wedetect.data.io import ImageReadError, load_pil_rgb

    written = []
    for qi, res in enumerate(results):
        folder = Path(output_dir) / f"{qi:02d}_{_slug(res.query)}"
        folder.mkdir(parents=True, exist_ok=True)
        for rank, hit in enumerate(res.hits):
            try:
                im = load_pil_rgb(hit.path)
            except ImageReadError:
                continue
            x1, y1, x2, y2 = hit.box
            if annotate:
                draw = ImageDraw.Draw(im)
                width = max(2, round(min(im.size) / 200))
                draw.rectangle([x1, y1, x2, y2], outline=(255, 64, 32), width=width)
                draw.text((x1 + width, max(0, y1 - 12)), f"{hit.score:.3f}", fill=(255, 64, 32))
            else:
                box = (
                    int(np.floor(max(0, x1))),
                    int(np.floor(max(0, y1))),
                    int(np.ceil(min(im.width, x2))),
                    int(np.ceil(min(im.height, y2))),
                )
                if box[2] <= box[0] or box[3] <= box[1]:
                    continue
                im = im.crop(box)
            out = folder / f"{rank:04d}_{_slug(Path(hit.path).stem, 60)}_{hit.score:.3f}.jpg"
            im.save(out, quality=92)
            written.append(out)
    return written
