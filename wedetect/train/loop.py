"""The training loop: official optimizer groups and schedule, EMA, AMP, accumulation, DDP, checkpoints.

One ``Trainer`` runs one config. Under ``torchrun`` it joins the process group (NCCL on CUDA,
gloo on CPU); every rank trains on its shard of a deterministic per-epoch permutation and rank 0
validates and writes checkpoints. Checkpoints use the official mmengine layout (``meta``,
``state_dict`` with official key names, ``optimizer``, ``param_schedulers``, ``message_hub``)
plus what exact resume needs (EMA, AMP scaler, RNG states, position inside the epoch).
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from wedetect.checkpoint import (
    load_into,
    official_state_dict,
    read_state_dict,
    to_official,
)
from wedetect.errors import WeDetectError
from wedetect.eval.detection import evaluate_coco
from wedetect.eval.runner import DETECTION_FIELDS, records_to_coco, run_over_images
from wedetect.inference import WeDetect
from wedetect.models.detector import WeDetectClosedSetModel, WeDetectModel
from wedetect.train.config import TrainConfig
from wedetect.train.dataset import (
    CocoData,
    PipelineConfig,
    TrainDataset,
    collate,
    load_coco,
)
from wedetect.train.losses import DetectionLoss

log = logging.getLogger("wedetect.train")


class TrainingError(WeDetectError):
    """Training cannot start or cannot go on."""


class DivergedError(TrainingError):
    """The loss became NaN or infinite; the last good checkpoint is left untouched."""


# ----------------------------------------------------------------------------------------------
# models


class TrainStep(nn.Module):
    """What DDP wraps: images (+ prompt tokens) -> per-level class logits and raw box logits."""

    def __init__(self, model: WeDetectModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        b = images.shape[0]
        if isinstance(self.model, WeDetectClosedSetModel):
            text = self.model.classifier(b)
        else:
            text = self.model.encode_text(input_ids, attention_mask).reshape(b, -1, self.model.config.embed_dim)
        return self.model(images, text)


def build_model(cfg: TrainConfig, class_embeddings: np.ndarray | None = None) -> WeDetectModel:
    """The network of a config, filled from ``cfg.checkpoint`` when given (official ``load_from``)."""
    config = cfg.model.build_config(cfg.data.image_size)
    if cfg.open_vocab:
        model = WeDetectModel(config, with_text=True)
    else:
        if class_embeddings is None:
            raise TrainingError("closed-set training needs class embeddings (class_embeddings: FILE.npy); "
                                "write them with `wedetect class-embeddings`")
        model = WeDetectClosedSetModel(config, class_embeddings=torch.from_numpy(np.asarray(class_embeddings, dtype=np.float32)))
    if cfg.checkpoint:
        state = read_state_dict(cfg.checkpoint)
        if not cfg.open_vocab:
            # The text tower is discarded; ``embeddings`` comes from the .npy unless the file has one.
            state = {k: v for k, v in state.items() if not k.startswith("backbone.text_model.")}
            state.setdefault(to_official("prompts"), model.prompts.detach().clone())
            if state[to_official("prompts")].shape != model.prompts.shape:
                state[to_official("prompts")] = model.prompts.detach().clone()
        model.unused_official_state = load_into(model, state, strict=True)
    return model


# ----------------------------------------------------------------------------------------------
# optimisation


def param_groups(model: nn.Module, cfg: TrainConfig, world_size: int) -> list[dict]:
    """Official ``YOLOWv5OptimizerConstructor`` groups, merged by identical settings.

    A parameter whose official name contains a custom key (longest key first) gets that key's
    lr multiplier and weight decay (default: the base decay, unscaled); every other parameter,
    biases and norms included, gets the base decay scaled by total batch / ``base_total_batch``.
    Official keys: text tower lr x 0.01, ``logit_scale`` no decay.
    """
    o = cfg.optim
    total = world_size * cfg.batch_size * cfg.accumulate
    accumulate = max(round(o.base_total_batch / total), 1)
    scaled_wd = o.weight_decay * total * accumulate / o.base_total_batch
    keys = sorted(o.custom_keys, key=len, reverse=True)
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        official = to_official(name)
        match = next((k for k in keys if k in official), None)
        if match is None:
            key = (1.0, scaled_wd)
        else:
            custom = o.custom_keys[match]
            key = (custom.lr_mult, o.weight_decay if custom.weight_decay is None else custom.weight_decay)
        groups.setdefault(key, []).append(p)
    return [{"params": ps, "lr": o.lr * mult, "lr_mult": mult, "weight_decay": wd}
            for (mult, wd), ps in groups.items()]


def lr_factor(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Product of the official two mmengine ``LinearLR`` schedules at optimizer step ``step``.

    Warm-up goes from ``warmup_start_factor`` to 1 at step ``warmup_iters - 1``; decay goes from
    1 to ``final_factor`` at the last step (mmengine's ``total_iters = end - begin - 1``).
    """
    o = cfg.optim
    warm = 1.0
    if o.warmup_iters > 1:
        warm = o.warmup_start_factor + (1 - o.warmup_start_factor) * min(step, o.warmup_iters - 1) / (o.warmup_iters - 1)
    decay = 1.0 - (1 - o.final_factor) * min(step, total_steps - 1) / max(total_steps - 1, 1)
    return warm * decay


class ModelEMA:
    """Exponential moving average of weights and buffers with YOLO-style ramped momentum.

    momentum(t) = (1 - m) exp(-(1 + t) / gamma) + m; ema <- (1 - momentum) ema + momentum model.
    """

    def __init__(self, model: nn.Module, momentum: float = 1e-4, gamma: float = 2000.0) -> None:
        self.module = _clone_module(model)
        self.momentum, self.gamma, self.steps = momentum, gamma, 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        m = (1 - self.momentum) * math.exp(-(1 + self.steps) / self.gamma) + self.momentum
        src = model.state_dict()
        for k, v in self.module.state_dict().items():
            if v.dtype.is_floating_point:
                v.mul_(1 - m).add_(src[k].detach(), alpha=m)
            else:
                v.copy_(src[k])
        self.steps += 1

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.steps = state["steps"]


def apply_gradients(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                    scheduler, ema: ModelEMA | None, grad_clip: float) -> None:
    """One optimizer step on the accumulated gradients: unscale and clip (when ``grad_clip``), step
    through the AMP scaler, clear the gradients, advance the schedule, update the EMA copy."""
    if grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    if ema is not None:
        ema.update(model)


def _clone_module(model: nn.Module) -> nn.Module:
    import copy

    clone = copy.deepcopy(model).eval()
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone


class EpochSampler(Sampler[int]):
    """mmengine ``DefaultSampler``: per-epoch permutation seeded with ``seed + epoch``, padded to a
    multiple of the world size, rank r taking every W-th index from r; can start mid-epoch."""

    def __init__(self, size: int, rank: int, world_size: int, seed: int, shuffle: bool = True) -> None:
        self.size, self.rank, self.world, self.seed, self.shuffle = size, rank, world_size, seed, shuffle
        self.epoch = 0
        self.start = 0  # samples of this rank to skip (resume inside an epoch)

    def indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        total = math.ceil(self.size / self.world) * self.world
        order = (order * math.ceil(total / self.size))[:total]
        return order[self.rank::self.world]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.start:])

    def __len__(self) -> int:
        return math.ceil(self.size / self.world) - self.start


# ----------------------------------------------------------------------------------------------
# distributed


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> DistInfo:
    """Join the ``torchrun`` process group when its environment is set; else single process."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")))
    if info.world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend)
    return info


def resolve_device(spec: str, info: DistInfo) -> torch.device:
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda" and info.world_size > 1:
        spec = f"cuda:{info.local_rank}"
    try:
        device = torch.device(spec)
    except RuntimeError as err:
        raise TrainingError(f"--device {spec}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError("--device cuda requested but CUDA is not available")
    return device


# ----------------------------------------------------------------------------------------------
# trainer


@dataclass
class TrainState:
    epoch: int = 0  # completed epochs
    iter_in_epoch: int = 0  # completed batches of the running epoch (mid-epoch resume)
    step: int = 0  # completed optimizer steps
    best_ap: float = -1.0
    best_epoch: int = 0


class Trainer:
    """Runs ``cfg``: builds data, model and optimizer, trains, validates and checkpoints."""

    def __init__(self, cfg: TrainConfig, resume: str | bool | None = None, progress: bool = True) -> None:
        self.cfg = cfg
        self.dist = init_distributed(cfg.device if cfg.device != "auto" else
                                     ("cuda" if torch.cuda.is_available() else "cpu"))
        self.device = resolve_device(cfg.device, self.dist)
        self.progress = progress and self.dist.is_main
        self.out = Path(cfg.output)
        seed = cfg.seed if cfg.seed is not None else int(np.random.SeedSequence().entropy % (2**31))
        self.seed = self._broadcast_int(seed)
        self._seed_everything(self.seed)

        self.train_data, self.val_data = self._load_data()
        self.tokenizer = None
        if cfg.open_vocab:
            from wedetect.models.text import load_tokenizer

            self.tokenizer = load_tokenizer(cfg.tokenizer)
        embeddings = None
        if not cfg.open_vocab and cfg.class_embeddings:
            embeddings = load_class_embeddings(cfg.class_embeddings, len(self.train_data.class_names))
        self.model = build_model(cfg, embeddings).to(self.device).train()
        if cfg.sync_bn and self.dist.world_size > 1 and self.device.type == "cuda":
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.step_module: nn.Module = TrainStep(self.model)
        if self.dist.world_size > 1:
            self.step_module = nn.parallel.DistributedDataParallel(
                self.step_module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False, find_unused_parameters=True)

        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg, self.dist.world_size),
                                           lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps)
        self.sampler = EpochSampler(len(self.train_set), self.dist.rank, self.dist.world_size, self.seed)
        self.iters_per_epoch = self._iters_per_epoch()
        self.total_steps = cfg.epochs * math.ceil(self.iters_per_epoch / cfg.accumulate)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.total_steps, cfg))
        self.ema = ModelEMA(self.model, cfg.ema_momentum, cfg.ema_gamma) if cfg.ema else None
        self.amp_dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp and self.amp_dtype == torch.float16)
        self.loss_fn = DetectionLoss(strides=self.model.config.strides, reg_max=self.model.config.reg_max)
        self.state = TrainState()
        self.history: list[dict] = []
        if resume:
            self.resume(resume)

    # -- setup ---------------------------------------------------------------------------------

    def _broadcast_int(self, value: int) -> int:
        if self.dist.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)  # NCCL needs a CUDA tensor
        dist.broadcast(t, 0)
        return int(t.item())

    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % (2**32))
        torch.manual_seed(seed)

    def _load_data(self) -> tuple[CocoData, CocoData | None]:
        d = self.cfg.data
        if not d.train_ann or not d.train_images:
            raise TrainingError("no training data: set data.train_ann and data.train_images")
        names = None
        if d.classes_file:
            from wedetect.data.classnames import load_class_names

            names = load_class_names(d.classes_file)
        mask = self.cfg.flavour == "mask_refine"
        train = load_coco(d.train_ann, d.train_images, names, with_masks=mask, min_size=d.min_image_size)
        val = None
        if d.val_ann and d.val_images:
            val = load_coco(d.val_ann, d.val_images, train.class_names, min_size=1)
            if val.category_ids != train.category_ids:
                raise TrainingError("train and val annotation files list different categories")
        if self.dist.is_main:
            for data in (train, val):
                if data is not None:
                    log.info(data.report.summary())
        a = self.cfg.augment
        self.train_set = TrainDataset(train, PipelineConfig(image_size=d.image_size, **a.model_dump()),
                                      open_vocab=self.cfg.open_vocab, seed=self.seed)
        return train, val

    def _iters_per_epoch(self) -> int:
        n = math.ceil(math.ceil(len(self.train_set) / self.dist.world_size) / self.cfg.batch_size)
        if self.cfg.max_iters_per_epoch:
            n = min(n, self.cfg.max_iters_per_epoch)
        return n

    def _loader(self, epoch: int, start_iter: int) -> DataLoader:
        self.train_set.epoch = epoch
        self.train_set.stage = 2 if epoch >= self.cfg.epochs - self.cfg.augment.close_mosaic_epochs else 1
        self.sampler.epoch = epoch
        self.sampler.start = start_iter * self.cfg.batch_size
        workers = self.cfg.data.num_workers
        # A private generator keeps DataLoader start-up from consuming the global torch RNG (exact resume).
        return DataLoader(self.train_set, batch_size=self.cfg.batch_size, sampler=self.sampler,
                          num_workers=workers, collate_fn=collate, worker_init_fn=_worker_init,
                          generator=torch.Generator().manual_seed(self.seed + epoch),
                          pin_memory=self.device.type == "cuda")

    # -- training ------------------------------------------------------------------------------

    def fit(self, until_epoch: int | None = None) -> TrainState:
        """Train the remaining epochs (or up to ``until_epoch``); validate and checkpoint after each."""
        last_epoch = min(until_epoch or self.cfg.epochs, self.cfg.epochs)
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(self.cfg.dump(), encoding="utf-8")
            reports = {name: d.report.to_dict() for name, d in (("train", self.train_data), ("val", self.val_data))
                       if d is not None}
            (self.out / "data_report.json").write_text(json.dumps(reports, indent=1), encoding="utf-8")
            log.info("seed %d, %d iterations/epoch, %d optimizer steps in all, device %s, world size %d",
                     self.seed, self.iters_per_epoch, self.total_steps, self.device, self.dist.world_size)
        while self.state.epoch < last_epoch:
            epoch = self.state.epoch
            losses = self.train_epoch(epoch)
            self.state.epoch, self.state.iter_in_epoch = epoch + 1, 0
            due = (epoch + 1) % self.cfg.val_interval == 0 or epoch + 1 == self.cfg.epochs
            metrics = self.validate() if self.val_data is not None and due else {}
            self._barrier()
            if self.dist.is_main:
                self.history.append({"epoch": epoch + 1, **losses, **{f"val/{k}": v for k, v in metrics.items()}})
                self.save_checkpoint(metrics)
            self._barrier()
        return self.state

    def train_epoch(self, epoch: int) -> dict[str, float]:
        self.model.train()
        loader = self._loader(epoch, self.state.iter_in_epoch)
        sums: dict[str, float] = {}
        count = 0
        bar = tqdm(total=self.iters_per_epoch, initial=self.state.iter_in_epoch, disable=not self.progress,
                   desc=f"epoch {epoch + 1}/{self.cfg.epochs}", leave=False)
        accumulated = self.state.iter_in_epoch % self.cfg.accumulate
        for batch in loader:
            if self.state.iter_in_epoch >= self.iters_per_epoch:
                break
            last = self.state.iter_in_epoch + 1 == self.iters_per_epoch
            values = self._forward_backward(batch)
            accumulated += 1
            if accumulated == self.cfg.accumulate or last:
                self._optimizer_step()
                accumulated = 0
            self.state.iter_in_epoch += 1
            count += 1
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.update(1)
            every = self.cfg.save_interval_iters
            due = every and accumulated == 0 and not last and self.state.iter_in_epoch % every == 0
            if due and self.dist.is_main:
                self._save_latest()
            if self.state.iter_in_epoch % self.cfg.log_interval == 0 and self.dist.is_main:
                lr = self.optimizer.param_groups[0]["lr"]
                log.info("epoch %d iter %d/%d lr %.3g %s", epoch + 1, self.state.iter_in_epoch,
                         self.iters_per_epoch, lr, " ".join(f"{k} {v:.4f}" for k, v in values.items()))
        bar.close()
        return {k: v / max(count, 1) for k, v in sums.items()}

    def _encode_prompts(self, prompts: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        flat = [p for image_prompts in prompts for p in image_prompts]
        tok = self.tokenizer(flat, padding=True, return_tensors="pt")
        return tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)

    def _forward_backward(self, batch) -> dict[str, float]:
        images = batch.images.to(self.device, non_blocking=True).float() / 255
        ids = mask = None
        if self.cfg.open_vocab:
            ids, mask = self._encode_prompts(batch.prompts)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.cfg.amp):
            cls_logits, reg_raw = self.step_module(images, ids, mask)
        out = self.loss_fn([c.float() for c in cls_logits], [r.float() for r in reg_raw],
                           batch.bboxes_labels.to(self.device), world_size=self.dist.world_size)
        total = out.total
        finite = torch.isfinite(total.detach()).float()
        if self.dist.world_size > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if finite.item() < 1:
            raise DivergedError(
                f"loss is not finite at epoch {self.state.epoch + 1}, iteration {self.state.iter_in_epoch + 1} "
                f"({out.as_dict()}); stopping. The last good checkpoint in {self.out} is intact; lower the "
                "learning rate or check the data, then resume from it")
        self.scaler.scale(total / self.cfg.accumulate).backward()
        return {**out.as_dict(), "loss": float(total.detach())}

    def _optimizer_step(self) -> None:
        apply_gradients(self.model, self.optimizer, self.scaler, self.scheduler, self.ema, self.cfg.optim.grad_clip)
        self.state.step += 1

    def _barrier(self) -> None:
        if self.dist.world_size > 1:
            dist.barrier()

    # -- validation ----------------------------------------------------------------------------

    def eval_model(self) -> WeDetectModel:
        """The weights that are validated and saved: the EMA copy when EMA is on."""
        return self.ema.module if self.ema is not None else self.model

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """COCO bbox AP of the validated weights (``eval_model``) on the validation split, rank 0 only.

        Predictions take the user inference path (``predict_coco``), so the numbers are those
        ``wedetect eval detection`` reports for the saved checkpoint; returns the evaluator's stats.
        """
        if not self.dist.is_main:
            return {}
        model = self.eval_model()
        was_training = model.training
        rows = predict_coco(model, self.val_data, self.device, self.tokenizer, self.cfg.data.val_batch_size,
                            progress=self.progress)
        model.train(was_training)
        if not rows:
            log.info("validation: no detections")
            return {"mAP": 0.0, "mAP_50": 0.0}
        metrics = evaluate_coco(self.val_data.raw, rows)
        log.info("validation after epoch %d: %s", self.state.epoch,
                 " ".join(f"{k} {v:.4f}" for k, v in metrics.reported.items()))
        return dict(metrics.stats)

    # -- checkpoints ---------------------------------------------------------------------------

    def checkpoint_dict(self, metrics: dict[str, float] | None = None) -> dict:
        eval_model = self.eval_model()
        meta = {
            "epoch": self.state.epoch,
            "iter": self.state.epoch * self.iters_per_epoch + self.state.iter_in_epoch,
            "cfg": self.cfg.dump(),
            "seed": self.seed,
            "experiment_name": self.out.name,
            "time": time.strftime("%Y%m%d_%H%M%S"),
            "dataset_meta": {"classes": tuple(n[0] for n in self.train_data.class_names)},
            "flavour": self.cfg.flavour,
        }
        raw = official_state_dict(self.model)
        state = {
            "meta": meta,
            "state_dict": official_state_dict(eval_model) if self.ema is not None else raw,
            "optimizer": self.optimizer.state_dict(),
            "param_schedulers": [self.scheduler.state_dict()],
            "message_hub": {"metrics": metrics or {}, "history": self.history},
            "trainer": self.state.__dict__.copy(),
            "rng": _rng_state(),
        }
        if self.ema is not None:
            state["raw_state_dict"] = raw
            state["ema"] = {"steps": self.ema.steps}
        if self.scaler.is_enabled():
            state["scaler"] = self.scaler.state_dict()
        return state

    def save_checkpoint(self, metrics: dict[str, float]) -> Path:
        """Write ``epoch_{k}.pth`` atomically, update ``last_checkpoint`` and ``best.pth``."""
        ap = metrics.get("mAP")
        if ap is not None and ap > self.state.best_ap:
            self.state.best_ap, self.state.best_epoch = ap, self.state.epoch
            improved = True
        else:
            improved = False
        path = self.out / f"epoch_{self.state.epoch}.pth"
        _atomic_save(self.checkpoint_dict(metrics), path)
        (self.out / "last_checkpoint").write_text(str(path.resolve()), encoding="utf-8")
        if improved and self.cfg.save_best:
            shutil.copyfile(path, self.out / "best.pth.tmp")
            os.replace(self.out / "best.pth.tmp", self.out / "best.pth")
        if self.cfg.keep_checkpoints > 0:
            for old in range(1, self.state.epoch - self.cfg.keep_checkpoints + 1):
                (self.out / f"epoch_{old}.pth").unlink(missing_ok=True)
        (self.out / "history.json").write_text(json.dumps(self.history, indent=1), encoding="utf-8")
        log.info("saved %s%s", path, " (best so far)" if improved else "")
        return path

    def _save_latest(self) -> None:
        """Mid-epoch checkpoint ``latest.pth`` (resume continues at this batch of the epoch)."""
        path = self.out / "latest.pth"
        self.out.mkdir(parents=True, exist_ok=True)
        _atomic_save(self.checkpoint_dict(), path)
        (self.out / "last_checkpoint").write_text(str(path.resolve()), encoding="utf-8")

    def resume(self, resume: str | bool) -> None:
        """Restore model, optimizer, scheduler, EMA, scaler, counters and RNG from a checkpoint."""
        if resume is True:
            marker = self.out / "last_checkpoint"
            if not marker.is_file():
                raise TrainingError(f"--resume: no last_checkpoint in {self.out}")
            path = Path(marker.read_text(encoding="utf-8").strip())
        else:
            path = Path(resume)
        if not path.is_file():
            raise TrainingError(f"--resume: checkpoint {path} not found")
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise TrainingError(f"--resume: cannot read {path} ({err})") from err
        if "trainer" not in ckpt or "optimizer" not in ckpt:
            raise TrainingError(f"{path} is not a training checkpoint of this tool (no optimizer/trainer state)")
        load_into(self.model, ckpt.get("raw_state_dict", ckpt["state_dict"]), strict=True)
        if self.ema is not None:
            if "raw_state_dict" in ckpt:
                load_into(self.ema.module, ckpt["state_dict"], strict=True)
                self.ema.steps = ckpt["ema"]["steps"]
            else:
                self.ema = ModelEMA(self.model, self.cfg.ema_momentum, self.cfg.ema_gamma)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["param_schedulers"][0])
        if "scaler" in ckpt and self.scaler.is_enabled():
            self.scaler.load_state_dict(ckpt["scaler"])
        self.state = TrainState(**ckpt["trainer"])
        # The run's seed drives the sampler and the augmentation: keep the original one.
        self.seed = self.train_set.seed = self.sampler.seed = int(ckpt["meta"]["seed"])
        self.history = list(ckpt.get("message_hub", {}).get("history", []))
        _set_rng_state(ckpt["rng"])
        if self.dist.is_main:
            log.info("resumed from %s at epoch %d, iteration %d", path, self.state.epoch, self.state.iter_in_epoch)


def _rng_state() -> dict:
    """Global RNG states in plain types, so checkpoints load with ``weights_only=True``."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    return {"python": [version, list(py_state), gauss], "numpy": [name, keys.tolist(), pos, has_gauss, cached],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(rng: dict) -> None:
    version, py_state, gauss = rng["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def _worker_init(_: int) -> None:
    import cv2

    cv2.setNumThreads(0)  # official: OpenCV threads off inside workers


def _atomic_save(obj: dict, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_class_embeddings(path: str | os.PathLike, num_classes: int) -> np.ndarray:
    """A (K, D) float32 .npy of class embeddings, checked against the class count."""
    p = Path(path)
    if not p.is_file():
        raise TrainingError(f"class embeddings {p} not found; write them with `wedetect class-embeddings`")
    try:
        arr = np.load(p)
    except (OSError, ValueError) as err:
        raise TrainingError(f"{p}: not a readable .npy file ({err})") from err
    if arr.ndim != 2 or arr.shape[0] != num_classes:
        raise TrainingError(f"{p}: expected ({num_classes}, D) class embeddings, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise TrainingError(f"{p}: contains NaN or infinite values")
    return arr.astype(np.float32)


def eval_detector(model: WeDetectModel, class_names: list[str], tokenizer=None,
                  device: torch.device | str = "cpu") -> WeDetect:
    """The in-memory network wrapped in the user inference API, prompted as official evaluation:
    every class name (first synonym) at once and no blank prompt; a closed-set model uses its classifier.

    The wrapper shares the network's weights (nothing is copied); it switches the network to eval mode.
    """
    detector = WeDetect(model, tokenizer, device=device)
    if isinstance(model, WeDetectClosedSetModel):
        detector.set_class_embeddings(model.prompts.detach(), class_names)
    else:
        detector.set_classes(class_names, blank=False)
    return detector


def predict_coco(model: WeDetectModel, data: CocoData, device: torch.device | str, tokenizer=None,
                 batch_size: int = 8, progress: bool = False) -> list[dict]:
    """COCO result rows for every image of ``data`` from the path ``wedetect eval detection`` takes:
    ``WeDetect.predict`` with the official test settings (score > 0.001, NMS 0.7, best 300 per image),
    the evaluation runner and its COCO row conversion."""
    detector = eval_detector(model, [names[0] for names in data.class_names], tokenizer, device)
    cfg = detector.postprocess_cfg

    def infer(paths: list[Path]) -> list:
        return detector.predict(paths, threshold=cfg.score_thr, max_detections=cfg.max_per_img,
                                batch_size=len(paths))

    records = run_over_images(infer, [(r.image_id, r.path) for r in data.records], DETECTION_FIELDS,
                              batch_size=batch_size, progress=progress)
    return records_to_coco(records, data.category_ids)
