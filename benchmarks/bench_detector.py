"""Detector / Uni speed: images/s and latency per size, batch and precision.

Times three stages for each configuration, on random weights of the official architecture (speed does
not depend on the values; no checkpoint needed):
- ``net``: backbone + neck + head (+ DFL decode) on a prepared batch;
- ``e2e``: decoded uint8 images -> letterbox -> network -> post-processing -> detections, in the
  ``reference`` mode (the official order of operations) and the ``fast`` mode (exact shortcuts), with
  the ratio between them measured in the same run; each call is a stream of ``--stream`` batches (as
  when a collection is processed), and the latency is the time per batch.
Post-processing runs every (prior, class) pair through the official order (score > 0.001, best
30000, class-aware NMS, best 300), with K = 80 classes + the blank prompt, as in COCO evaluation.

Examples:
    python benchmarks/bench_detector.py                          # CPU: tiny+base, batch 1, fp32
    python benchmarks/bench_detector.py --sizes base large --batches 1 16 --dtypes float32 float16 --device cuda
    python benchmarks/bench_detector.py --sizes base --batches 16 --dtypes float16 --device cuda \
        --accel none overlap channels_last+cudagraphs channels_last+cudagraphs+overlap all
"""
from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import time

import numpy as np
import torch

from wedetect import WeDetect, WeDetectUni
from wedetect.checkpoint import _no_init
from wedetect.config import get_config
from wedetect.data.letterbox import letterbox_detector, to_tensor
from wedetect.models.detector import WeDetectModel, WeDetectUniModel

# Backbone + neck GFLOP per image measured for the official code (benchmarks/official_bench_h100.json).
GFLOP = {"base": 284.2, "large": 2546.0}
# The FLOP floor: backbone + neck at ~800 TFLOP/s (bf16, H100), ~2800 img/s Base, ~310 Large.
FLOOR_TFLOPS = 800.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return out


def _model(size: str, kind: str, device, dtype: str, mode: str = "fast"):
    cfg = get_config(size)
    torch.manual_seed(0)
    with _no_init():
        net = WeDetectUniModel(cfg) if kind == "uni" else WeDetectModel(cfg)
    # Deterministic, sane values (not the skipped init's garbage): small weights, unit BN statistics.
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(torch.randn_like(p) * 0.02 if p.ndim > 1 else torch.ones_like(p) * (0.0 if "bias" in name else 1.0))
        for name, b in net.named_buffers():
            if "running_var" in name:
                b.fill_(1.0)
            elif "running_mean" in name:
                b.zero_()
    if kind == "uni":
        return WeDetectUni(net, device=device, dtype=dtype)
    model = WeDetect(net, device=device, dtype=dtype, mode=mode)
    emb = torch.nn.functional.normalize(torch.randn(81, cfg.embed_dim), dim=-1)
    model.set_class_embeddings(emb[:80], [f"c{i}" for i in range(80)], blank_embedding=emb[80])
    _calibrate(model)
    return model


@torch.no_grad()
def _calibrate(model: WeDetect) -> None:
    """Set each level's logit scale and bias so logits follow N(-6, 2), like a trained detector's:
    ~2/3 of (prior, class) pairs pass the 0.001 score filter, ~0.5 % pass the demo's 0.3."""
    rng = np.random.default_rng(1)
    s = model.config.input_size
    x = to_tensor([rng.integers(0, 255, (s, s, 3), dtype=np.uint8)]).to(model.device, model.dtype)
    text = model._class_embeds.to(model.dtype)[None]
    feats = model.model.forward_features(x)
    for f, cls, contrast in zip(feats, model.model.head.cls_preds, model.model.head.cls_contrasts):
        dots = torch.einsum("bchw,bkc->bkhw", contrast.norm(cls(f)), text).float()
        contrast.logit_scale.fill_(float(np.log(2.0 / dots.std().item())))
        contrast.bias.fill_(-6.0 - dots.mean().item() * 2.0 / dots.std().item())


# --accel variants: "none" or parts joined by "+" (e.g. channels_last+cudagraphs+overlap), each a
# keyword argument of ``accelerate`` (opt-in speed paths, timed after the plain one); "all" is every part
# that suits a GPU.
ACCEL_PARTS = {
    "channels_last": {"channels_last": True},
    "compile": {"compile": "default"},
    "cudagraphs": {"compile": "reduce-overhead"},
    "device_letterbox": {"device_letterbox": True},
    "overlap": {"overlap": True},
}
ACCEL_ALL = "channels_last+cudagraphs+device_letterbox+overlap"


def accel_kwargs(name: str) -> dict:
    """``accelerate`` arguments of an --accel variant; every option not in it is turned off."""
    kwargs = {"channels_last": False, "compile": False, "device_letterbox": False, "overlap": False}
    if name == "none":
        return kwargs
    for part in (ACCEL_ALL if name == "all" else name).split("+"):
        if part not in ACCEL_PARTS:
            raise argparse.ArgumentTypeError(f"unknown --accel part {part!r} (parts: {', '.join(ACCEL_PARTS)})")
        kwargs.update(ACCEL_PARTS[part])
    return kwargs


def _accel_name(name: str) -> str:
    accel_kwargs(name)
    return name


def _stages(model, kind: str, images: list[np.ndarray], batch: torch.Tensor, args, modes) -> list[tuple]:
    """(stage, mode, callable) triples timed for one configuration."""
    bs = len(images)
    stages = [("net", "-", lambda: model.forward_raw(batch))]

    def e2e(mode: str) -> None:
        model.mode = mode
        stream = images * args.stream  # several batches per call, as a collection is processed
        if kind == "uni":  # the official proposal script keeps scores > 0.1
            model.propose(stream, num_proposals=300, score_threshold=0.1, batch_size=bs)
        else:
            model.predict(stream, threshold=args.threshold, max_detections=300, batch_size=bs)

    # reference = the official order of operations; fast = exact shortcuts
    return stages + [("e2e", mode, functools.partial(e2e, mode)) for mode in modes]


def run(args) -> list[dict]:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    rng = np.random.default_rng(0)
    rows = []
    for kind in args.kinds:
        for size in args.sizes:
            if kind == "uni" and size == "tiny":
                continue
            for dtype in args.dtypes:
                model = _model(size, kind, device, dtype)
                s = model.config.input_size
                for bs in args.batches:
                    images = [rng.integers(0, 255, (720, 1280, 3), dtype=np.uint8) for _ in range(bs)]
                    batch = to_tensor([letterbox_detector(im[:, :, ::-1], s)[0] for im in images]).to(device)
                    base = None
                    for accel in args.accel:
                        model.accelerate(**accel_kwargs(accel))
                        # The reference mode is the baseline: timed once, on the plain path.
                        modes = args.modes if accel == "none" else [m for m in args.modes if m != "reference"]
                        for stage, mode, fn in _stages(model, kind, images, batch, args, modes):
                            # e2e runs args.stream batches per call: time per batch
                            med = statistics.median(_time(fn, device, args.warmup, args.iters))
                            med /= args.stream if stage == "e2e" else 1
                            row = dict(kind=kind, size=size, dtype=dtype, batch=bs, accel=accel, stage=stage,
                                       mode=mode, latency_ms=round(med * 1e3, 2), img_per_s=round(bs / med, 2))
                            if mode == "reference":
                                base = med
                            elif mode == "fast" and base is not None:
                                row["speedup_vs_reference"] = round(base / med, 2)
                            if size in GFLOP:
                                row["tflops"] = round(GFLOP[size] * bs / med / 1e3, 2)
                                row["floor_share"] = round(row["tflops"] / FLOOR_TFLOPS, 4)
                            rows.append(row)
                            print(json.dumps(row), flush=True)
                    model.accelerate(**accel_kwargs("none"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", nargs="+", default=["detector"], choices=["detector", "uni"])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "base"], choices=["tiny", "base", "large"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1])
    parser.add_argument("--dtypes", nargs="+", default=["float32"])
    parser.add_argument("--modes", nargs="+", default=["reference", "fast"], choices=["reference", "fast"])
    parser.add_argument("--accel", nargs="+", default=["none"], type=_accel_name,
                        help="opt-in speed paths to time after the plain one: none, all, or parts joined by + "
                             f"({', '.join(ACCEL_PARTS)}); compile and cudagraphs compile during the warm-up")
    parser.add_argument("--threshold", type=float, default=0.3,
                        help="predict() threshold for e2e (0.3: the demo; 0.001: evaluation)")
    parser.add_argument("--stream", type=int, default=4,
                        help="e2e: batches per call (a stream of images, so that overlapped post-processing can "
                             "hide behind the next batch); latency is per batch")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    device_name = torch.cuda.get_device_name() if args.device != "cpu" and torch.cuda.is_available() else platform.processor() or "cpu"
    print(f"# device: {device_name}; torch {torch.__version__}; threads {torch.get_num_threads()}")
    rows = run(args)
    print("\n| kind | size | dtype | batch | accel | stage | mode | img/s | latency ms | fast/reference | TFLOP/s | "
          "FLOP-floor share |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kind']} | {r['size']} | {r['dtype']} | {r['batch']} | {r['accel']} | {r['stage']} | {r['mode']} | "
              f"{r['img_per_s']} | {r['latency_ms']} | {r.get('speedup_vs_reference', '')} | {r.get('tflops', '')} | "
              f"{r.get('floor_share', '')} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_name, "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
