"""How well do IVF cells hold a query's true neighbours? A torch simulation of the partitioning alone.

Trains k-means on a sample of the synthetic proposals of ``index_search.py`` (the same generator,
so the rows can be regenerated from their ids), assigns the exact top-k of each query (saved by an
``index_search.py`` run as ``exact_q*_k*.json``) to cells, probes cells by their centroid's
similarity to the query, and prints the share of the true top-k inside the probed cells (the recall
bound of an IVF index with exact re-ranking) with the rows scanned, per ``nprobes``.

    python benchmarks/ivf_partition_sim.py --truth /work/bench/rows10000000_float16/exact_q30_k100.json \
        --rows 10000000 --partitions 1220 --metric cosine

``--metric``: ``cosine`` (spherical k-means, assign and probe by direction), ``dot`` (assign to the
centroid of largest inner product) or ``l2``. Used for the partition-metric choice in ``docs/index.md``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from index_search import EMBED_DIM, LEVEL_BIAS, LEVEL_SCALE, PER_IMAGE, Synthetic  # noqa: E402

from wedetect.index.store import query_vectors  # noqa: E402

CHUNK = 200_000  # index_search.py writes (and seeds) its rows in chunks of this size


def vectors(syn: Synthetic, chunk: int, rows: int) -> torch.Tensor:
    """The stored [exp(s) e, b] rows of one chunk, exactly as index_search.py generated them
    (the draws depend on the chunk's length, so the last, shorter chunk must be asked as such)."""
    n = min(CHUNK, rows - chunk * CHUNK)
    e, level = syn.embeddings(n, chunk)
    v = np.zeros((n, EMBED_DIM + 1), np.float32)
    v[:, :EMBED_DIM] = e * np.exp(LEVEL_SCALE[level])[:, None]
    v[:, EMBED_DIM] = LEVEL_BIAS[level]
    return torch.from_numpy(v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--truth", type=Path, required=True, help="exact_q*_k*.json of an index_search.py run")
    ap.add_argument("--rows", type=int, required=True, help="rows of that run")
    ap.add_argument("--clusters", type=int, default=2048, help="as in that run")
    ap.add_argument("--partitions", type=int, required=True)
    ap.add_argument("--metric", choices=["cosine", "dot", "l2"], default="cosine")
    ap.add_argument("--sample-per-partition", type=int, default=256, help="training rows per cell (Lance: 256)")
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--nprobes", default="1,2,4,8,16,32,64")
    args = ap.parse_args()

    torch.manual_seed(0)
    syn = Synthetic(args.clusters)
    chunks = (args.rows + CHUNK - 1) // CHUNK
    need = args.sample_per_partition * args.partitions
    parts = []
    for c in range(chunks):
        v = vectors(syn, c, args.rows)
        parts.append(v[torch.randperm(len(v))[: need // chunks + 1]])
    train = torch.cat(parts)[:need]

    def prep(v: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(v, dim=1) if args.metric == "cosine" else v

    train = prep(train)
    centroids = train[torch.randperm(len(train))[: args.partitions]].clone()

    def assign(v: torch.Tensor) -> torch.Tensor:
        if args.metric == "l2":
            return torch.cdist(v, centroids).argmin(1)
        return (v @ centroids.T).argmax(1)

    for _ in range(args.iterations):
        a = torch.cat([assign(train[i : i + 65536]) for i in range(0, len(train), 65536)])
        sums = torch.zeros_like(centroids).index_add_(0, a, train)
        counts = torch.bincount(a, minlength=args.partitions).float()
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
        if args.metric == "cosine":
            centroids = torch.nn.functional.normalize(centroids, dim=1)

    truth = [[img * PER_IMAGE + rank for img, rank in t] for t in json.loads(args.truth.read_text())["truth"]]
    cell: dict[int, int] = {}
    for c in sorted({row // CHUNK for rows in truth for row in rows}):
        rows = sorted({row for rows in truth for row in rows if row // CHUNK == c})
        cells = assign(prep(vectors(syn, c, args.rows)[torch.tensor(rows) % CHUNK]))
        cell.update(zip(rows, cells.tolist()))
    sizes = torch.bincount(assign(prep(vectors(syn, 0, args.rows))), minlength=args.partitions).float()
    sizes *= args.rows / sizes.sum()
    q = torch.from_numpy(query_vectors(torch.from_numpy(syn.queries(len(truth))), EMBED_DIM + 1))
    ranked = (prep(q) @ centroids.T).argsort(1, descending=True)
    print(f"{args.metric} k-means, {args.partitions} cells, {len(truth)} queries, {int((~filled).sum())} empty")
    for n in map(int, args.nprobes.split(",")):
        inside = [np.mean([cell[r] in set(ranked[i, :n].tolist()) for r in rows]) for i, rows in enumerate(truth)]
        scanned = float(np.mean([sizes[ranked[i, :n]].sum() for i in range(len(truth))]))
        print(f"nprobes {n:4d}: top-k inside {np.mean(inside):.3f} (min {np.min(inside):.2f}), rows scanned {scanned:,.0f}")


if __name__ == "__main__":
    main()
