"""Test doubles for the object index: a deterministic fake WeDetect-Uni proposer and image helpers."""

from __future__ import annotations

import time
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from wedetect.structures import Detections

# Per-level logit scale (before exp) and bias, like the three levels of the real head.
LEVEL_SCALE = torch.tensor([2.1, 2.6, 2.9])
LEVEL_BIAS = torch.tensor([-1.5, -2.0, -1.1])


class FakeProposer:
    """Proposals derived only from the pixels, so a re-run yields identical outputs.

    The embeddings are random but with per-proposal norms that vary a lot, so ranking by cosine
    similarity differs from the official score. ``delay`` seconds are spent per image (for
    the kill test), ``calls`` counts the images processed.
    """

    def __init__(self, embed_dim: int = 768, delay: float = 0.0) -> None:
        self.embed_dim = embed_dim
        self.delay = delay
        self.calls = 0

    def propose_one(self, image: Image.Image) -> Detections:
        arr = np.asarray(image.convert("RGB"))
        g = torch.Generator().manual_seed(zlib.crc32(arr.tobytes()))
        n = 2 + int(torch.randint(0, 6, (1,), generator=g))
        h, w = arr.shape[:2]
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w / 2, h / 2])
        wh = torch.rand(n, 2, generator=g) * torch.tensor([w / 2, h / 2]) + 1
        levels = torch.randint(0, 3, (n,), generator=g)
        norms = torch.rand(n, 1, generator=g) * 3 + 0.2
        emb = torch.nn.functional.normalize(torch.randn(n, self.embed_dim, generator=g), dim=1) * norms
        return Detections(
            boxes=torch.cat([xy, xy + wh], 1),
            scores=torch.rand(n, generator=g).sort(descending=True).values,
            labels=torch.zeros(n, dtype=torch.int64),
            names=[""] * n,
            image_size=(h, w),
            embeddings=emb,
            levels=levels,
            logit_scale=LEVEL_SCALE[levels],
            logit_bias=LEVEL_BIAS[levels],
        )

    def propose(self, images, num_proposals=300, score_threshold=0.0, batch_size=8, progress=False):
        out = []
        for im in images:
            if self.delay:
                time.sleep(self.delay)
            self.calls += 1
            out.append(self.propose_one(im))
        return out


def make_images(folder: Path, n: int, start: int = 0, size: tuple[int, int] = (24, 32)) -> list[Path]:
    """``n`` distinct small PNGs named img_XXXX.png."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        rng = np.random.default_rng(i)
        arr = rng.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8)
        p = folder / f"img_{i:04d}.png"
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths


def official_scores(det: Detections, text: torch.Tensor) -> torch.Tensor:
    """The official retrieval formula, float32: sigmoid(exp(s) * (e . t) + b), (N, Q)."""
    logits = torch.exp(det.logit_scale.float())[:, None] * (det.embeddings.float() @ text.float().T)
    return torch.sigmoid(logits + det.logit_bias.float()[:, None])


def unit_texts(q: int, dim: int = 768, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(q, dim, generator=g), dim=1)


MODEL = {"name": "uni_fake.pth", "sha256": "ab" * 32, "num_proposals": 300, "score_threshold": 0.0, "size": None}
