"""The "Speed" issue's goals, measured: our fastest exact path per goal against its target, our
reference mode (the official order of operations) timed in the same run, and the official H100 numbers.

Each goal is end to end from decoded 1280x720 images to final detections (or Uni proposals), in a
stream of ``--stream`` batches per call (``bench_detector.py``'s e2e stage). The accelerated path is
``--accel`` (default ``channels_last+cudagraphs+overlap``: exact up to float rounding; device
letterboxing is left out because it moves ~0.1 % of input pixels by one grey level). The FLOP floor is
the issue's: backbone + neck FLOPs at ~800 TFLOP/s (bf16, H100), ~2800 img/s for Base, ~310 for Large.

    python benchmarks/goals.py --device cuda                      # every goal (compiles each configuration)
    python benchmarks/goals.py --device cuda --only detector-base-b16 uni-base-b16
    python benchmarks/goals.py --device cpu --size tiny --accel overlap --only detector-base-b1   # smoke run
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import bench_detector as bench
import torch

OFFICIAL = json.loads((Path(__file__).with_name("official_bench_h100.json")).read_text())


@dataclass(frozen=True)
class Goal:
    kind: str  # "detector" or "uni"
    size: str
    batch: int
    target: float
    metric: str  # "img/s" (at least target) or "latency ms" (at most target)
    official_dtype: str  # the official row this goal is read against

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.size}-b{self.batch}"


GOALS = [
    Goal(kind, size, batch, target, metric, official_dtype)
    for kind in ("detector", "uni")  # "Same for Uni proposals"
    for size, batch, target, metric, official_dtype in (
        ("base", 16, 330.0, "img/s", "fp16"),
        ("large", 16, 140.0, "img/s", "fp16"),
        ("base", 1, 5.0, "latency ms", "fp32"),
    )
]


def _official(size: str, dtype: str, batch: int) -> dict | None:
    return next((r for r in OFFICIAL if (r["size"], r["dtype"], r["bs"]) == (size, dtype, batch)), None)


def measure(goal: Goal, args) -> dict:
    """Reference and plain fast e2e, then the accelerated fast e2e, for one goal; a row of the table."""
    size = args.size or goal.size
    run_args = argparse.Namespace(
        kinds=[goal.kind], sizes=[size], batches=[goal.batch], dtypes=[args.dtype], modes=["reference", "fast"],
        accel=["none", args.accel], threshold=args.threshold, device=args.device, warmup=args.warmup,
        iters=args.iters, stream=args.stream,
    )
    rows = [r for r in bench.run(run_args) if r["stage"] == "e2e"]
    ref = next(r for r in rows if r["mode"] == "reference")
    plain = next(r for r in rows if r["mode"] == "fast" and r["accel"] == "none")
    best = next(r for r in rows if r["mode"] == "fast" and r["accel"] == args.accel)
    value = best["img_per_s"] if goal.metric == "img/s" else best["latency_ms"]
    met = value >= goal.target if goal.metric == "img/s" else value <= goal.target
    official = _official(goal.size, goal.official_dtype, goal.batch)
    out = dict(goal=goal.name, kind=goal.kind, size=size, batch=goal.batch, dtype=args.dtype, accel=args.accel,
               metric=goal.metric, target=goal.target, value=value, met=bool(met) and size == goal.size,
               img_per_s=best["img_per_s"], latency_ms=best["latency_ms"], plain_fast_img_per_s=plain["img_per_s"],
               reference_img_per_s=ref["img_per_s"], vs_reference=round(best["img_per_s"] / ref["img_per_s"], 2))
    if official is not None and size == goal.size:
        out["official_img_per_s"] = official["img_per_s_total"]
        out["vs_official"] = round(best["img_per_s"] / official["img_per_s_total"], 2)
    if size in bench.GFLOP:
        out["floor_share"] = round(best["img_per_s"] * bench.GFLOP[size] / (bench.FLOOR_TFLOPS * 1e3), 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=[g.name for g in GOALS], help="these goals (default: all)")
    parser.add_argument("--dtype", default="float16", help="precision of the measured paths (the official "
                        "batch-16 rows are fp16)")
    parser.add_argument("--accel", default="channels_last+cudagraphs+overlap", type=bench._accel_name,
                        help="the accelerated path (bench_detector.py --accel syntax)")
    parser.add_argument("--size", choices=["tiny", "base", "large"],
                        help="run every goal's configuration on this size instead (a smoke run: never 'met')")
    parser.add_argument("--threshold", type=float, default=0.3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--warmup", type=int, default=2, help="calls before timing (the first compiles)")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--stream", type=int, default=4, help="batches per timed call")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    goals = [g for g in GOALS if not args.only or g.name in args.only]
    if args.size == "tiny" and any(g.kind == "uni" for g in goals):
        parser.error("WeDetect-Uni comes in base and large only: pick detector goals with --only for --size tiny")
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"# device: {device_name}; torch {torch.__version__}")
    rows = []
    for goal in goals:
        rows.append(measure(goal, args))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n| goal | target | ours ({args.accel}, {args.dtype}) | met | img/s | plain fast img/s | "
          "reference img/s | x reference | official H100 img/s | x official | FLOP-floor share |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        target = f"{'>=' if r['metric'] == 'img/s' else '<='} {r['target']:g} {r['metric']}"
        print(f"| {r['goal']}{'' if r['size'] in r['goal'] else ' (on ' + r['size'] + ')'} | {target} | "
              f"{r['value']} | {'yes' if r['met'] else 'no'} | {r['img_per_s']} | {r['plain_fast_img_per_s']} | "
              f"{r['reference_img_per_s']} | {r['vs_reference']} | {r.get('official_img_per_s', '')} | "
              f"{r.get('vs_official', '')} | {r.get('floor_share', '')} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device_name, "torch": torch.__version__, "rows": rows},
                                              indent=1))


if __name__ == "__main__":
    main()
