"""Object-index benchmark: search latency and recall@k of the ANN index against exact search.

Synthetic proposals in the real layout: 768-d batch-normalised-like embeddings drawn around
random cluster centres (real Uni embeddings cluster by object kind), three pyramid levels
with their own logit scale and bias, 300 proposals per "image", stored as the 784-d augmented
vectors ``[exp(s) * e, b, 0...]`` the index uses. Queries are unit text-like vectors near
cluster directions. Everything goes through the real LanceDB store (writes, exact scan, IVF
index, search), so the numbers are those of ``wedetect index search``.

    python benchmarks/index_search.py --rows 1000000 --dir /tmp/wedetect-bench
    python benchmarks/index_search.py --rows 10000000 --vector-dtype float16 --dir /tmp/wedetect-bench

Prints one JSON object: write and index-build throughput, exact (brute-force) search time per
query, ANN latency p50/p95, recall@k against exact, the exact/ANN latency ratio, and the
indexing throughput of ``build_index`` on real image files with a model-free proposer.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wedetect.index.build import ExtractionSettings, build_index  # noqa: E402
from wedetect.index.lancedb_store import LanceDBStore  # noqa: E402
from wedetect.index.store import (  # noqa: E402
    ImageRecord,
    IndexMeta,
    ProposalBatch,
    exact_search,
    query_vectors,
    vector_dim_for,
)
from wedetect.structures import Detections  # noqa: E402

EMBED_DIM = 768
PER_IMAGE = 300
LEVEL_SCALE = np.array([2.3, 2.6, 2.9], np.float32)
LEVEL_BIAS = np.array([-9.0, -10.0, -11.0], np.float32)
MODEL = {"name": "synthetic", "sha256": "0" * 64, "num_proposals": PER_IMAGE, "score_threshold": 0.0, "size": None}


class Synthetic:
    """Clustered embeddings: centre (unit) * 12 + isotropic noise, like BN outputs with structure."""

    def __init__(self, clusters: int, seed: int = 0) -> None:
        g = np.random.default_rng(seed)
        c = g.standard_normal((clusters, EMBED_DIM), dtype=np.float32)
        self.centres = c / np.linalg.norm(c, axis=1, keepdims=True)
        self.seed = seed

    def embeddings(self, n: int, chunk: int) -> tuple[np.ndarray, np.ndarray]:
        g = np.random.default_rng((self.seed, chunk))
        which = g.integers(0, len(self.centres), n)
        e = self.centres[which] * 12.0 + g.standard_normal((n, EMBED_DIM), dtype=np.float32) * 0.8
        return e.astype(np.float32), g.integers(0, 3, n).astype(np.int8)

    def queries(self, q: int) -> np.ndarray:
        g = np.random.default_rng(10_000 + self.seed)
        t = (
            self.centres[g.integers(0, len(self.centres), q)]
            + g.standard_normal((q, EMBED_DIM), dtype=np.float32) * 0.03
        )
        return t / np.linalg.norm(t, axis=1, keepdims=True)


def _batch(syn: Synthetic, start: int, n: int, chunk: int, vdim: int) -> tuple[list[ImageRecord], ProposalBatch]:
    e, level = syn.embeddings(n, chunk)
    s, b = LEVEL_SCALE[level], LEVEL_BIAS[level]
    vec = np.zeros((n, vdim), np.float32)
    vec[:, :EMBED_DIM] = e * np.exp(s)[:, None]
    vec[:, EMBED_DIM] = b
    ids = (start + np.arange(n)) // PER_IMAGE
    records = [
        ImageRecord(int(i), f"synthetic/{i:09d}.jpg", f"{i:064x}", 480, 640, int((ids == i).sum()), file_size=1)
        for i in np.unique(ids)
    ]
    # Boxes and objectness scores vary like real ones (a constant column would get an encoding whose
    # random reads cost Lance 5x more); drawn apart from the embeddings, which stay as in earlier runs.
    g = np.random.default_rng((syn.seed, chunk, 1))
    xy = g.random((n, 2), dtype=np.float32) * np.float32([560, 400])
    boxes = np.concatenate([xy, xy + 8 + g.random((n, 2), dtype=np.float32) * 72], axis=1)
    batch = ProposalBatch(
        ids.astype(np.int64),
        ((start + np.arange(n)) % PER_IMAGE).astype(np.int32),
        boxes,
        g.random(n, dtype=np.float32),
        level,
        s,
        b,
        vec,
    )
    return records, batch


def fill(store: LanceDBStore, syn: Synthetic, rows: int, chunk_rows: int) -> float:
    t0 = time.perf_counter()
    for ci, start in enumerate(range(0, rows, chunk_rows)):
        n = min(chunk_rows, rows - start)
        records, batch = _batch(syn, start, n, ci, store.meta.vector_dim)
        # Image rows are cut at chunk borders (300 does not divide the chunk); the benchmark
        # never reads them, so the partial rows are only bookkeeping.
        store._append_proposals(batch)
        store._append_images(records)
        print(f"  wrote {start + n:,}/{rows:,} rows", file=sys.stderr, flush=True)
    store._proposals.optimize()  # compact the chunks' fragments, as `index add` does at its end
    return time.perf_counter() - t0


def update_cost(store: LanceDBStore, syn: Synthetic, rows: int, append: int, q: np.ndarray, k: int) -> dict:
    """Seconds to bring the ANN index up to date after appending ``append`` rows (the delta file),
    the search latency with those rows in the delta (default settings), then the update after
    removing them again (a rewrite of the main file, as every update cost before the delta file);
    the index ends with the rows it started with."""
    start = -(-rows // PER_IMAGE) * PER_IMAGE  # the next free image id
    records, batch = _batch(syn, start, append, 1_000_000, store.meta.vector_dim)
    store._append_proposals(batch)
    store._append_images(records)
    out: dict = {"rows_appended": append}
    for step in ("append", "remove"):
        if step == "remove":
            store.remove_images([r.image_id for r in records])
        t0 = time.perf_counter()
        store._proposals.optimize()  # what optimize() does first: compact the table's new fragments
        store._images.optimize()
        t1 = time.perf_counter()
        store._sync_faiss()
        out[f"{step}_table_optimize_s"] = round(t1 - t0, 2)
        out[f"{step}_ann_update_s"] = round(time.perf_counter() - t1, 2)
        if step == "append":
            store.search(q[:3], k, exact=False)  # warm up
            lat = []
            for i in range(len(q)):
                t0 = time.perf_counter()
                store.search(q[i : i + 1], k, exact=False)
                lat.append(time.perf_counter() - t0)
            out["p50_ms_with_delta"] = round(float(np.percentile(lat, 50)) * 1e3, 2)
        print(f"  update after {step}: " + json.dumps(out), file=sys.stderr, flush=True)
    return out


def drop_page_cache(loc: Path, keep_ann: bool) -> None:
    """Evict the index's files from the OS page cache (all of them, or all but the ANN index's), so
    the next reads of them go to the disk."""
    ann = {p for d in (loc / "ann_faiss", loc / "proposals.lance" / "_indices") for p in d.rglob("*")}
    for path in loc.rglob("*"):
        if path.is_file() and not (keep_ann and path in ann):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def stage(result: dict, **values) -> None:
    """Record results and echo them at once (a long run shows its partial numbers)."""
    result.update(values)
    print("  " + json.dumps(values), file=sys.stderr, flush=True)


def keys(hits) -> set[tuple[int, int]]:
    return set(zip(hits.proposals.image_id.tolist(), hits.proposals.rank.tolist()))


class _Proposer:
    """Model-free stand-in for WeDetectUni: measures the indexing pipeline around the model."""

    def propose(self, images, num_proposals=300, score_threshold=0.0, batch_size=8, progress=False):
        out = []
        for im in images:
            n = num_proposals
            out.append(
                Detections(
                    boxes=torch.rand(n, 4) * 100,
                    scores=torch.rand(n),
                    labels=torch.zeros(n, dtype=torch.int64),
                    image_size=(im.height, im.width),
                    embeddings=torch.randn(n, EMBED_DIM),
                    levels=torch.randint(0, 3, (n,)),
                    logit_scale=torch.full((n,), 2.6),
                    logit_bias=torch.full((n,), -10.0),
                )
            )
        return out


def indexing_throughput(workdir: Path, images: int) -> dict:
    from PIL import Image

    folder = workdir / "images"
    folder.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(0)
    for i in range(images):
        Image.fromarray(g.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)
    report = build_index(
        workdir / "pipeline.index",
        folder,
        _Proposer(),
        model=MODEL,
        settings=ExtractionSettings(commit_every=64),
        progress=False,
    )
    return {
        "images": images,
        "seconds": round(report.seconds, 2),
        "images_per_s": round(report.images_per_second, 1),
        "proposals_per_s": round(report.proposals / report.seconds, 0),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="synthetic proposals")
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "wedetect-bench")
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--k", type=int, default=100, help="recall@k")
    ap.add_argument("--clusters", type=int, default=2048)
    ap.add_argument("--vector-dtype", default="float32", choices=["float32", "float16"])
    ap.add_argument("--index-type", default=None, help="FAISS_IVF_SQ8 (default) or a LanceDB type (IVF_RQ, IVF_PQ, ...)")
    ap.add_argument("--metric", default="cosine", choices=["cosine", "dot", "l2"], help="IVF partition metric")
    ap.add_argument("--partitions", type=int, default=None)
    ap.add_argument("--sub-vectors", type=int, default=None)
    ap.add_argument("--nprobes", default="32", help="comma-separated values to sweep")
    ap.add_argument("--refine-factor", default="10", help="comma-separated values to sweep")
    ap.add_argument("--exact-rerank", default="1", help="comma-separated values to sweep (LanceDB; 1: off)")
    ap.add_argument(
        "--cache",
        default="warm",
        choices=["warm", "rows-cold", "cold"],
        help="OS page cache before every timed query: warm (as the previous queries left it), rows-cold (the "
        "table's files evicted, the ANN index's kept: the index in memory, the rows on disk), cold (every "
        "index file evicted: every byte from the disk)",
    )
    ap.add_argument("--exact-runs", type=int, default=1, help="single-query brute-force passes timed")
    ap.add_argument("--pipeline-images", type=int, default=64, help="images for the indexing-throughput run (0: skip)")
    ap.add_argument(
        "--reuse", action="store_true", help="reuse the rows, exact results and ANN index of a previous run"
    )
    ap.add_argument("--rebuild-index", action="store_true", help="with --reuse: build the ANN index again")
    ap.add_argument(
        "--append-rows", type=int, default=0,
        help="after the searches, time the ANN index update for this many appended rows, then for their removal",
    )
    args = ap.parse_args()

    torch.set_num_threads(os.cpu_count() or 1)
    workdir = args.dir / f"rows{args.rows}_{args.vector_dtype}"
    loc = workdir / "index"
    result: dict = {
        "rows": args.rows,
        "dim": vector_dim_for(EMBED_DIM),
        "vector_dtype": args.vector_dtype,
        "cpus": os.cpu_count(),
        "k": args.k,
        "queries": args.queries,
    }
    syn = Synthetic(args.clusters)
    if not (args.reuse and loc.exists()):
        shutil.rmtree(workdir, ignore_errors=True)
        meta = IndexMeta(EMBED_DIM, vector_dim_for(EMBED_DIM), MODEL, vector_dtype=args.vector_dtype)
        store = LanceDBStore(str(loc), meta=meta)
        secs = fill(store, syn, args.rows, 200_000)
        stage(result, write_rows_per_s=round(args.rows / secs))
    store = LanceDBStore(str(loc))
    result["disk_gb"] = round(sum(f.stat().st_size for f in loc.rglob("*") if f.is_file()) / 1e9, 2)
    q = query_vectors(torch.from_numpy(syn.queries(args.queries)), store.meta.vector_dim)

    # Brute force: all queries in one streamed pass (ground truth), and single-query passes (latency).
    # Both are kept in the work folder, so --reuse runs only sweep the ANN settings.
    truth_file = workdir / f"exact_q{args.queries}_k{args.k}.json"
    if args.reuse and truth_file.exists():
        saved = json.loads(truth_file.read_text())
        truth = [set(map(tuple, t)) for t in saved.pop("truth")]
        result.update(saved)
    else:
        t0 = time.perf_counter()
        exact = exact_search(store.iter_proposals(262_144), q, args.k)
        stage(result, exact_batch_s_per_query=round((time.perf_counter() - t0) / args.queries, 4))
        singles = []
        for i in range(args.exact_runs):
            t0 = time.perf_counter()
            exact_search(store.iter_proposals(262_144), q[i : i + 1], args.k)
            singles.append(time.perf_counter() - t0)
        stage(result, exact_single_query_s=round(float(np.median(singles)), 4))
        truth = [keys(h) for h in exact]
        timings = {k: result[k] for k in ("exact_batch_s_per_query", "exact_single_query_s")}
        truth_file.write_text(json.dumps({"truth": [sorted(t) for t in truth], **timings}))

    if args.rebuild_index or not (args.reuse and store.has_ann_index()):
        t0 = time.perf_counter()
        result["index"] = store.build_ann_index(
            index_type=args.index_type,
            metric=args.metric,
            num_partitions=args.partitions,
            num_sub_vectors=args.sub_vectors,
        )
        stage(result, index_build_s=round(time.perf_counter() - t0, 1))

    result["search"] = []
    for nprobes in map(int, args.nprobes.split(",")):
        sweep = itertools.product(map(int, args.refine_factor.split(",")), map(int, args.exact_rerank.split(",")))
        for refine, rerank in sweep:
            opts = {"nprobes": nprobes, "refine_factor": refine, "exact_rerank": rerank}
            store.search(q[:3], args.k, exact=False, **opts)  # warm up
            lat, recall = [], []
            for i in range(args.queries):
                if args.cache != "warm":
                    drop_page_cache(loc, keep_ann=args.cache == "rows-cold")
                t0 = time.perf_counter()
                (hits,) = store.search(q[i : i + 1], args.k, exact=False, **opts)
                lat.append(time.perf_counter() - t0)
                recall.append(len(keys(hits) & truth[i]) / args.k)
            p50 = float(np.percentile(lat, 50)) * 1e3
            row = opts | {
                "cache": args.cache,
                "p50_ms": round(p50, 2),
                "p95_ms": round(float(np.percentile(lat, 95)) * 1e3, 2),
                f"recall@{args.k}": round(float(np.mean(recall)), 4),
                f"min_recall@{args.k}": round(float(np.min(recall)), 4),
                "speedup_vs_exact_single_query": round(result["exact_single_query_s"] * 1e3 / p50, 1),
            }
            print("  " + json.dumps(row), file=sys.stderr, flush=True)
            result["search"].append(row)
    if args.append_rows:
        result["update"] = update_cost(store, syn, args.rows, args.append_rows, q, args.k)
    if args.pipeline_images:
        result["indexing"] = indexing_throughput(workdir, args.pipeline_images)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
