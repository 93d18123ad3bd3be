"""Training throughput: images/s of full training steps, and the share of the device's FLOP bound.

One step is what ``wedetect.train.loop.Trainer`` does per batch with the official optimizer: forward
(image tower + neck + head, and the text tower on every image's prompts in the open-vocabulary
flavour), the detection loss, backward, gradient clipping, the AdamW step with the official parameter
groups, the learning-rate schedule and the EMA update. Batches are synthetic in the official layout
(``--image-size`` RGB images, ``--boxes`` random boxes per image, ``--prompts`` prompts per image as
``RandomLoadText`` gives on COCO: positives + sampled negatives = all 80 names, random token ids);
weights are random (speed does not depend on the values; no checkpoint or tokenizer needed).
Warm-up steps are not timed.

The first precision is the baseline of the ratio column (default ``fp32``: the official default, no
AMP; on GPUs strict fp32, ``tf32`` enables TF32 matmuls and convolutions); ``bf16`` / ``fp16`` run the
forward under ``torch.autocast`` (fp16 with a gradient scaler) like ``amp: true``. Training FLOPs per
image are counted with ``torch.utils.flop_counter.FlopCounterMode`` over one forward + backward
(matrix products and convolutions; the optimizer's element-wise work is not counted); achieved
FLOP/s are divided by the device peak: ``--peak-tflops``, else the data sheet of known GPUs (dense),
else, on CPU, the fastest of large float32 matmuls measured in this process.

Examples:
    python benchmarks/bench_train.py --device cpu --threads 1 --sizes tiny --batch 1 --precisions fp32
    python benchmarks/bench_train.py --device cuda --sizes tiny base large --precisions fp32 tf32 bf16 fp16
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wedetect.train.config import TrainConfig
from wedetect.train.loop import (
    ModelEMA,
    TrainStep,
    apply_gradients,
    build_model,
    lr_factor,
    param_groups,
)
from wedetect.train.losses import DetectionLoss

# Dense peak TFLOP/s per precision (vendor data sheets, SXM parts; fp32 = non-tensor-core FMA rate).
KNOWN_PEAKS = {
    "H100": {"fp32": 67.0, "tf32": 494.0, "bf16": 989.0, "fp16": 989.0},
    "H200": {"fp32": 67.0, "tf32": 494.0, "bf16": 989.0, "fp16": 989.0},
    "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0},
}
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_batch(batch: int, size: int, boxes: int, prompts: int, tokens: int, vocab: int,
                    generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random uint8 images, GT rows ``[image, label, x1, y1, x2, y2]`` and prompt token ids.

    Each image has ``boxes`` objects labelled with its first ``min(boxes, prompts)`` prompts; every
    prompt is a random name of 3..``tokens`` tokens (``<s> ... </s>``), padded to ``tokens``.
    """
    g = generator
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g)
    rows = []
    for i in range(batch):
        wh = torch.empty(boxes, 2).uniform_(size / 40, size / 2, generator=g)
        xy = torch.rand(boxes, 2, generator=g) * (size - wh)
        labels = torch.randint(0, min(boxes, prompts), (boxes, 1), generator=g).float()
        rows.append(torch.cat([torch.full((boxes, 1), float(i)), labels, xy, xy + wh], 1))
    # XLM-R ids: <s>=0, <pad>=1, </s>=2; names are random ids of the rest of the vocabulary.
    n = batch * prompts
    lengths = torch.randint(3, tokens + 1, (n,), generator=g)
    ids = torch.randint(4, vocab, (n, tokens), generator=g)
    pos = torch.arange(tokens)[None]
    ids[pos >= lengths[:, None]] = 1
    ids[:, 0] = 0
    ids[torch.arange(n), lengths - 1] = 2
    return {"images": images, "bboxes_labels": torch.cat(rows), "input_ids": ids,
            "attention_mask": (pos < lengths[:, None]).long()}


class StepRunner:
    """The Trainer's per-batch work (``Trainer._forward_backward`` + ``_optimizer_step``, no
    accumulation) on one synthetic batch, at an explicit precision (the Trainer's ``amp: true``
    picks fp16 on CUDA and bf16 on CPU)."""

    def __init__(self, cfg: TrainConfig, precision: str, device: torch.device, batch: dict) -> None:
        self.cfg, self.device = cfg, device
        embeddings = None
        if not cfg.open_vocab:  # closed set: a classifier row per prompt instead of the text tower
            num_prompts = batch["input_ids"].shape[0] // batch["images"].shape[0]
            embed_dim = cfg.model.build_config(cfg.data.image_size).embed_dim
            embeddings = np.random.default_rng(0).standard_normal((num_prompts, embed_dim))
        self.model = build_model(cfg, embeddings).to(device).train()
        self.step_module = TrainStep(self.model)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg, 1), lr=cfg.optim.lr,
                                           betas=cfg.optim.betas, eps=cfg.optim.eps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, 10**6, cfg))
        self.ema = ModelEMA(self.model, cfg.ema_momentum, cfg.ema_gamma) if cfg.ema else None
        self.amp_dtype = AMP_DTYPES.get(precision)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.loss_fn = DetectionLoss(strides=self.model.config.strides, reg_max=self.model.config.reg_max)
        self.batch = {k: v.to(device) for k, v in batch.items()}
        self.open_vocab = cfg.open_vocab

    def forward_backward(self) -> torch.Tensor:
        b = self.batch
        images = b["images"].float() / 255
        text = (b["input_ids"], b["attention_mask"]) if self.open_vocab else ()
        amp = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()
        with amp:
            cls_logits, reg_raw = self.step_module(images, *text)
        out = self.loss_fn([c.float() for c in cls_logits], [r.float() for r in reg_raw], b["bboxes_labels"],
                           world_size=1)
        self.scaler.scale(out.total).backward()
        return out.total.detach()

    def step(self) -> None:
        self.forward_backward()
        apply_gradients(self.model, self.optimizer, self.scaler, self.scheduler, self.ema, self.cfg.optim.grad_clip)


def train_flops(runner: StepRunner) -> float:
    """FLOPs of one forward + backward of the runner's batch (gradients are discarded)."""
    counter = FlopCounterMode(display=False)
    with counter:
        runner.forward_backward()
    runner.optimizer.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def measured_peak(device: torch.device, n: int = 2048, seconds: float = 2.0) -> float:
    """TFLOP/s of the fastest of float32 n x n matmuls repeated for about ``seconds`` in this process
    (the fastest, so that other jobs on a shared machine lower the peak as little as possible).

    Used as the CPU's peak for every precision: CPUs without native half-precision arithmetic
    compute bf16/fp16 in float32 units (a half-precision matmul is far slower, not a peak).
    """
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    a @ b
    times: list[float] = []
    start = time.perf_counter()
    while not times or time.perf_counter() - start < seconds:
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times) / 1e12


def device_peak(device: torch.device, precision: str, override: float | None) -> tuple[float, str]:
    if override:
        return override, "--peak-tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peaks in KNOWN_PEAKS.items():
            if key in name:
                return peaks[precision], f"{key} data sheet (dense)"
        raise SystemExit(f"unknown GPU {name!r}: pass --peak-tflops")
    return measured_peak(device), "fp32 matmul measured in this process"


def run(args) -> list[dict]:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = []
    for size in args.sizes:
        cfg = TrainConfig.model_validate({
            "flavour": args.flavour, "model": {"size": size}, "data": {"image_size": args.image_size},
            "batch_size": args.batch, "ema": args.ema,
        })
        vocab = cfg.model.build_config(args.image_size).text.vocab_size
        batch = synthetic_batch(args.batch, args.image_size, args.boxes, args.prompts, args.prompt_tokens, vocab,
                                torch.Generator().manual_seed(0))
        base = None
        for precision in args.precisions:
            if device.type == "cuda":  # fp32: strict; tf32: TF32 tensor cores for matmuls and convolutions
                torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
            torch.manual_seed(0)
            runner = StepRunner(cfg, precision, device, batch)
            flops = train_flops(runner)
            for _ in range(args.warmup):
                runner.step()
            _sync(device)
            times = []
            for _ in range(args.iters):
                t0 = time.perf_counter()
                runner.step()
                _sync(device)
                times.append(time.perf_counter() - t0)
            med = statistics.median(times)
            peak, source = device_peak(device, precision, args.peak_tflops)
            achieved = flops / med / 1e12
            row = {"size": size, "precision": precision, "batch": args.batch, "image_size": args.image_size,
                   "step_s": round(med, 3), "img_per_s": round(args.batch / med, 3),
                   "train_gflop_per_img": round(flops / args.batch / 1e9, 1),
                   "achieved_tflops": round(achieved, 3), "peak_tflops": round(peak, 3), "peak_source": source,
                   "flop_share": round(achieved / peak, 4)}
            if base is None:
                base = med
            row["speed_vs_first"] = round(base / med, 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
            del runner
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny"], choices=["tiny", "base", "large"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "tf32", "bf16", "fp16"],
                        help="the first is the baseline of the ratio column (official: fp32, no AMP)")
    parser.add_argument("--batch", type=int, default=4, help="images per step (official: 4 per GPU)")
    parser.add_argument("--image-size", type=int, default=640)
    parser.add_argument("--flavour", default="open_vocab", choices=["open_vocab", "closed_set"])
    parser.add_argument("--prompts", type=int, default=80, help="prompts per image (official max_num_samples)")
    parser.add_argument("--prompt-tokens", type=int, default=8, help="token length of the padded prompts")
    parser.add_argument("--boxes", type=int, default=8, help="objects per image")
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                        help="update an EMA copy each step (official recipe: off)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's; 1 is far faster on a loaded machine)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, help="device peak for the FLOP share (default: known GPUs; CPU: measured)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    if args.batch < 1 or args.iters < 1 or args.prompts < 1 or args.boxes < 1 or args.prompt_tokens < 3:
        parser.error("--batch, --iters, --prompts, --boxes must be >= 1 and --prompt-tokens >= 3")
    if args.threads:
        torch.set_num_threads(args.threads)
    on_gpu = args.device != "cpu" and torch.cuda.is_available()
    device_name = torch.cuda.get_device_name() if on_gpu else f"{platform.machine()} CPU, {os.cpu_count()} cores"
    print(f"# device: {device_name}; torch {torch.__version__}; threads {torch.get_num_threads()}", flush=True)
    rows = run(args)
    print(f"\n| size | precision | batch | img/s | step s | train GFLOP/img | TFLOP/s | peak TFLOP/s (source) | "
          f"FLOP share | vs {args.precisions[0]} |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['precision']} | {r['batch']} | {r['img_per_s']} | {r['step_s']} | "
              f"{r['train_gflop_per_img']} | {r['achieved_tflops']} | {r['peak_tflops']} ({r['peak_source']}) | "
              f"{100 * r['flop_share']:.1f}% | {r['speed_vs_first']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_name, "torch": torch.__version__, "args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
