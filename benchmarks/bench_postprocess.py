"""Post-processing alone: the official order (``reference``) against the exact shortcuts (``fast``).

Inputs are synthetic scenes shaped like a trained model's output at 640 input (8400 priors): each of
``--objects`` objects covers the priors whose centres fall inside it with jittered copies of its box
and raised logits for its class (strongest near its centre); every other (prior, class) logit follows
N(-6, 2). That gives the duplicates NMS exists for, and the long tail of low scores that the
evaluation threshold (0.001) lets through. Detector: 80 classes + blank; Uni: 256 objectness prompts.
The fast path is timed with one NMS call per label and with labels grouped into shared calls (the
GPU default); ``fast ms`` is this device's default.

Examples:
    python benchmarks/bench_postprocess.py                   # CPU
    python benchmarks/bench_postprocess.py --device cuda
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from wedetect import postprocess
from wedetect.postprocess import (
    PostprocessConfig,
    UniPostprocessConfig,
    detector_postprocess,
    detector_postprocess_fast,
    uni_postprocess,
    uni_postprocess_fast,
)
from wedetect.structures import LetterboxMeta

INPUT = 640
META = LetterboxMeta((720, 1280), INPUT, (0.5, 0.5), (140.0, 140.0, 0.0, 0.0))


def scene(labels: int, objects: int, seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (8400, labels), input-pixel boxes (8400, 4)) of one synthetic image."""
    g = torch.Generator().manual_seed(seed)
    centres = []
    for stride in (8, 16, 32):
        n = INPUT // stride
        ys, xs = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        centres.append((torch.stack([xs, ys], -1).reshape(-1, 2).float() + 0.5) * stride)
    c = torch.cat(centres)
    strides = torch.cat([torch.full(((INPUT // s) ** 2,), float(s)) for s in (8, 16, 32)])
    n_priors = c.shape[0]
    # Background: a box a few strides wide around each prior centre, logits N(-6, 2).
    wh = strides[:, None] * (2 + 6 * torch.rand(n_priors, 2, generator=g))
    boxes = torch.cat([c - wh / 2, c + wh / 2], dim=1)
    logits = torch.randn(n_priors, labels, generator=g) * 2 - 6
    o_c = torch.rand(objects, 2, generator=g) * INPUT
    o_wh = 20 + torch.rand(objects, 2, generator=g) * 280
    o_lab = torch.randint(0, labels, (objects,), generator=g)
    for j in range(objects):
        lo, hi = o_c[j] - o_wh[j] / 2, o_c[j] + o_wh[j] / 2
        inside = ((c >= lo) & (c <= hi)).all(1).nonzero().view(-1)
        if inside.numel() == 0:
            continue
        closeness = 1 - ((c[inside] - o_c[j]).abs() / (o_wh[j] / 2)).max(1).values
        jitter = torch.randn(inside.numel(), 4, generator=g) * 0.05 * o_wh[j].repeat(2)
        boxes[inside] = torch.cat([lo, hi])[None] + jitter
        logits[inside, o_lab[j]] += 4 + 6 * closeness
    return logits.to(device), boxes.to(device)


def _median_s(fn, device: torch.device, iters: int) -> float:
    fn()
    out = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


DET_CFG, UNI_CFG = PostprocessConfig(), UniPostprocessConfig()
# kind -> (labels, thresholds timed, reference(logits, boxes), fast(logits, boxes, threshold))
KINDS = {
    "detector": (81, (0.001, 0.3), lambda lg, bx: detector_postprocess(lg, bx, META, DET_CFG),
                 lambda lg, bx, t: detector_postprocess_fast(lg, bx, META, DET_CFG, t)),
    "uni": (256, (0.0, 0.1), lambda lg, bx: uni_postprocess(lg, bx, META, 300, UNI_CFG),
            lambda lg, bx, t: uni_postprocess_fast(lg, bx, META, 300, UNI_CFG, t)),
}


def run(args) -> list[dict]:
    device = torch.device(args.device)
    rows = []
    for kind in args.kinds:
        labels, thresholds, reference, fast = KINDS[kind]
        scenes = [scene(labels, args.objects, seed, device) for seed in range(args.images)]
        ref_s = statistics.mean(_median_s(lambda: reference(lg, bx), device, args.iters) for lg, bx in scenes)
        for thr in thresholds:
            # Per-label NMS with one call per label and with labels grouped into shared calls (the default on
            # GPUs, see postprocess._label_groups); both must keep the reference's detections above the
            # threshold: same scores, in order.
            times, same = {}, True
            for grouped in (False, True):
                postprocess.GROUP_LABELS = grouped
                times[grouped] = statistics.mean(_median_s(lambda: fast(lg, bx, thr), device, args.iters)
                                                 for lg, bx in scenes)
                same &= all(torch.equal(fast(lg, bx, thr)[1], (s := reference(lg, bx)[1])[s > thr])
                            for lg, bx in scenes)
            postprocess.GROUP_LABELS = None
            fast_s = times[device.type == "cuda"]
            row = dict(kind=kind, threshold=thr, objects=args.objects, reference_ms=round(ref_s * 1e3, 2),
                       fast_ms=round(fast_s * 1e3, 2), speedup=round(ref_s / fast_s, 2), same_scores=same,
                       fast_per_label_calls_ms=round(times[False] * 1e3, 2),
                       fast_grouped_calls_ms=round(times[True] * 1e3, 2))
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    parser.add_argument("--images", type=int, default=4, help="synthetic scenes (times are averaged)")
    parser.add_argument("--objects", type=int, default=20, help="objects per scene")
    parser.add_argument("--iters", type=int, default=3)
    args = parser.parse_args()
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(f"# device: {dev}; torch {torch.__version__}; threads {torch.get_num_threads()}")
    rows = run(args)
    print("\n| kind | threshold | reference ms/image | fast ms/image | fast / reference | same scores | "
          "fast, a call per label | fast, grouped labels |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kind']} | {r['threshold']} | {r['reference_ms']} | {r['fast_ms']} | {r['speedup']} | "
              f"{r['same_scores']} | {r['fast_per_label_calls_ms']} | {r['fast_grouped_calls_ms']} |")


if __name__ == "__main__":
    main()
