"""The training loop: schedule, parameter groups, sampler, checkpoints, exact resume, NaN guard, flavours."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import tiny_config

from wedetect.train.config import load_config
from wedetect.train.loop import (
    DivergedError,
    EpochSampler,
    Trainer,
    build_model,
    lr_factor,
    param_groups,
)


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny convolutions are far faster single-threaded on a shared 2-core machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_schedule_matches_the_official_coco_numbers() -> None:
    cfg = load_config("wedetect_base_coco_full_tuning")
    total = 12 * 3697  # 8 x 4 images per step over COCO train2017
    lr = [cfg.optim.lr * lr_factor(t, total, cfg) for t in (0, 999, 29576, total - 1)]
    assert lr[0] == pytest.approx(2e-8, rel=1e-9)
    assert lr[1] == pytest.approx(1.955e-5, rel=1e-3)
    assert lr[2] == pytest.approx(6.68e-6, rel=1e-3)
    assert lr[3] == pytest.approx(2e-8, rel=1e-9)
    assert lr_factor(500, total, cfg) == pytest.approx((0.001 + 0.999 * 500 / 999) * (1 - 0.999 * 500 / (total - 1)))


def test_param_groups_follow_the_official_custom_keys() -> None:
    cfg = load_config("synth_nano", ["optim.lr=1.0", "optim.custom_keys={}"], batch_size=3)
    cfg = cfg.model_copy(update={"optim": load_config("wedetect_base_coco_full_tuning").optim})
    model = build_model(cfg)
    groups = param_groups(model, cfg, world_size=8)  # total batch 24 -> wd x 1.125 (official quirk)
    by_param = {id(p): g for g in groups for p in g["params"]}
    names = dict(model.named_parameters())
    text = by_param[id(names["text_tower.proj.weight"])]
    assert text["lr"] == pytest.approx(2e-7) and text["weight_decay"] == pytest.approx(0.05)
    scale = by_param[id(names["head.cls_contrasts.0.logit_scale"])]
    assert scale["lr"] == pytest.approx(2e-5) and scale["weight_decay"] == 0.0
    for name in ("head.cls_contrasts.0.bias", "neck.Rep_p4.m.conv1.alpha", "image_tower.stages.0.0.gamma"):
        g = by_param[id(names[name])]
        assert g["lr"] == pytest.approx(2e-5) and g["weight_decay"] == pytest.approx(0.05 * 1.125), name
    assert sum(len(g["params"]) for g in groups) == len(names)


def test_sampler_shards_pads_and_resumes_mid_epoch() -> None:
    ranks = [EpochSampler(10, r, 3, seed=4) for r in range(3)]
    shards = [s.indices() for s in ranks]
    assert [len(s) for s in shards] == [4, 4, 4]
    assert sorted({i for s in shards for i in s}) == list(range(10))
    again = EpochSampler(10, 1, 3, seed=4)
    assert again.indices() == shards[1]
    again.epoch = 1
    assert again.indices() != shards[1]
    again.epoch, again.start = 0, 2
    assert list(again) == shards[1][2:] and len(again) == 2


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_checkpoints_use_the_official_layout_and_keep_the_best(synth_data: dict, tmp_path: Path) -> None:
    trainer = Trainer(tiny_config(synth_data, tmp_path / "run"), progress=False)
    state = trainer.fit()
    assert state.epoch == 2 and state.step == 4
    ckpt = _state(tmp_path / "run" / "epoch_2.pth")
    assert {"meta", "state_dict", "optimizer", "param_schedulers", "message_hub"} <= ckpt.keys()
    assert ckpt["meta"]["epoch"] == 2 and ckpt["meta"]["iter"] == 4
    assert ckpt["meta"]["dataset_meta"]["classes"][0] == synth_data["names"][0][0]
    keys = ckpt["state_dict"].keys()
    assert any(k.startswith("backbone.image_model.model.stages.") for k in keys)
    assert any(k.startswith("backbone.text_model.model.encoder.") for k in keys)
    assert "backbone.text_model.head.weight" in keys and "bbox_head.head_module.cls_contrasts.0.logit_scale" in keys
    assert Path((tmp_path / "run" / "last_checkpoint").read_text()).name == "epoch_2.pth"
    assert (tmp_path / "run" / "best.pth").is_file()
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["train"]["images_kept"] == 48 and report["val"]["images_kept"] == 16
    best = _state(tmp_path / "run" / "best.pth")["meta"]["epoch"]
    assert best == state.best_epoch
    assert "mAP_50" in ckpt["message_hub"]["metrics"]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return _state(path)["state_dict"]


@pytest.mark.slow
def test_resume_is_exact_after_an_epoch_and_mid_epoch(synth_data: dict, tmp_path: Path, monkeypatch) -> None:
    straight = Trainer(tiny_config(synth_data, tmp_path / "a", val_interval=5), progress=False)
    straight.fit()
    reference = _weights(tmp_path / "a" / "epoch_2.pth")

    first = Trainer(tiny_config(synth_data, tmp_path / "b", val_interval=5), progress=False)
    first.fit(until_epoch=1)
    resumed = Trainer(tiny_config(synth_data, tmp_path / "b", val_interval=5), resume=True, progress=False)
    assert resumed.state.epoch == 1
    resumed.fit()
    for k, v in _weights(tmp_path / "b" / "epoch_2.pth").items():
        assert torch.equal(v, reference[k]), k

    # Crash in the second batch of epoch 2; latest.pth was written after its first batch.
    cfg = tiny_config(synth_data, tmp_path / "c", val_interval=5, save_interval_iters=1)
    crashing = Trainer(cfg, progress=False)
    calls = {"n": 0}
    original = Trainer._optimizer_step

    def step_then_crash(self):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        original(self)

    monkeypatch.setattr(Trainer, "_optimizer_step", step_then_crash)
    with pytest.raises(KeyboardInterrupt):
        crashing.fit()
    monkeypatch.setattr(Trainer, "_optimizer_step", original)
    resumed = Trainer(cfg, resume=True, progress=False)
    assert (resumed.state.epoch, resumed.state.iter_in_epoch) == (1, 1)
    resumed.fit()
    for k, v in _weights(tmp_path / "c" / "epoch_2.pth").items():
        assert torch.equal(v, reference[k]), k


@pytest.mark.slow
def test_nan_loss_stops_with_the_last_good_checkpoint_intact(synth_data: dict, tmp_path: Path, monkeypatch) -> None:
    from wedetect.train.losses import DetectionLoss

    trainer = Trainer(tiny_config(synth_data, tmp_path / "run", val_interval=5), progress=False)
    trainer.fit(until_epoch=1)
    good = (tmp_path / "run" / "epoch_1.pth").read_bytes()
    original = DetectionLoss.__call__

    def nan_loss(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        out.loss_cls = out.loss_cls * float("nan")
        return out

    monkeypatch.setattr(DetectionLoss, "__call__", nan_loss)
    with pytest.raises(DivergedError, match="not finite at epoch 2, iteration 1.*last good checkpoint"):
        trainer.fit()
    assert (tmp_path / "run" / "epoch_1.pth").read_bytes() == good
    assert not (tmp_path / "run" / "epoch_2.pth").exists()


@pytest.mark.slow
def test_accumulation_ema_and_amp(synth_data: dict, tmp_path: Path) -> None:
    cfg = tiny_config(synth_data, tmp_path / "run", epochs=1, max_iters_per_epoch=3, accumulate=2, ema=True,
                      amp=True, val_interval=5)
    trainer = Trainer(cfg, progress=False)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    state = trainer.fit()
    assert state.step == 2  # 3 batches, 2 per step, the epoch's last batch flushes the rest
    assert trainer.total_steps == 2
    ckpt = _state(tmp_path / "run" / "epoch_1.pth")
    ema, raw = ckpt["state_dict"], ckpt["raw_state_dict"]
    key = "bbox_head.head_module.cls_preds.0.2.weight"
    start = before["head.cls_preds.0.2.weight"]
    # The EMA moved towards the raw weights but not all the way (ramped momentum).
    assert 0 < (ema[key] - start).abs().sum() < (raw[key] - start).abs().sum()
    assert all(torch.isfinite(v).all() for v in raw.values() if v.is_floating_point())


@pytest.mark.slow
def test_closed_set_from_class_embeddings(synth_data: dict, tmp_path: Path) -> None:
    from wedetect.models.text import load_tokenizer
    from wedetect.train.embeddings import class_embeddings, load_text_detector

    Trainer(tiny_config(synth_data, tmp_path / "ov", epochs=1, val_interval=5), progress=False).fit()
    ov_ckpt = tmp_path / "ov" / "epoch_1.pth"
    detector = load_text_detector(ov_ckpt)
    tok = load_tokenizer(synth_data["tokenizer"])
    emb = class_embeddings(detector, tok, synth_data["names"])
    assert emb.shape == (len(synth_data["names"]), 64) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(emb, class_embeddings(detector, tok, synth_data["names"]))  # eval mode
    # Row k embeds the FIRST name of class k.
    ids = tok([synth_data["names"][2][0]], return_tensors="pt")
    one = detector.encode_text(ids["input_ids"], ids["attention_mask"]).detach().numpy()[0]
    np.testing.assert_allclose(emb[2], one, atol=1e-6)
    np.save(tmp_path / "emb.npy", emb)

    cfg = tiny_config(synth_data, tmp_path / "cs", epochs=1, flavour="closed_set", checkpoint=str(ov_ckpt),
                      class_embeddings=str(tmp_path / "emb.npy"), val_interval=1)
    trainer = Trainer(cfg, progress=False)
    np.testing.assert_array_equal(trainer.model.prompts.detach().numpy(), emb)
    image_weight = "bbox_head.head_module.reg_preds.0.2.weight"
    np.testing.assert_array_equal(trainer.model.head.reg_preds[0][2].weight.detach().numpy(),
                                  _weights(ov_ckpt)[image_weight].numpy())
    trainer.fit()
    sd = _weights(tmp_path / "cs" / "epoch_1.pth")
    assert sd["embeddings"].shape == emb.shape
    assert not any(k.startswith("backbone.text_model.") for k in sd)
    assert not np.array_equal(sd["embeddings"].numpy(), emb)  # the classifier was trained


def test_closed_set_needs_matching_embeddings(synth_data: dict, tmp_path: Path) -> None:
    from wedetect.train.loop import TrainingError

    np.save(tmp_path / "bad.npy", np.zeros((3, 64), np.float32))
    cfg = tiny_config(synth_data, tmp_path / "cs", flavour="closed_set", class_embeddings=str(tmp_path / "bad.npy"))
    with pytest.raises(TrainingError, match=r"expected \(9, D\) class embeddings"):
        Trainer(cfg, progress=False)
    cfg = tiny_config(synth_data, tmp_path / "cs", flavour="closed_set")
    with pytest.raises(TrainingError, match="class-embeddings"):
        Trainer(cfg, progress=False)


def test_iterations_per_epoch_follow_the_sharding(synth_data: dict, tmp_path: Path) -> None:
    cfg = tiny_config(synth_data, tmp_path / "x", max_iters_per_epoch=None, batch_size=5)
    trainer = Trainer(cfg, progress=False)
    assert trainer.iters_per_epoch == math.ceil(48 / 5)
    assert trainer.total_steps == 2 * math.ceil(48 / 5)
