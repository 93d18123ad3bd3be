"""Typed YAML configs: the shipped official recipes, --set overrides and clear errors."""
from __future__ import annotations

from pathlib import Path

import pytest

from wedetect.train.config import ConfigError, load_config, parse_override


@pytest.mark.parametrize("name,flavour", [
    ("wedetect_base_coco_full_tuning", "open_vocab"),
    ("wedetect_base_coco_full_tuning_mask_refine", "mask_refine"),
    ("wedetect_base_coco_vision_encoder", "closed_set"),
])
def test_shipped_coco_configs_hold_the_official_recipe(name: str, flavour: str) -> None:
    cfg = load_config(name)
    assert cfg.flavour == flavour and cfg.model.size == "base" and cfg.checkpoint == "wedetect_base.pth"
    assert (cfg.epochs, cfg.batch_size, cfg.accumulate) == (12, 4, 1)
    o = cfg.optim
    assert (o.lr, o.weight_decay, o.grad_clip, o.warmup_iters, o.final_factor) == (2e-5, 0.05, 10.0, 1000, 0.001)
    assert o.custom_keys["backbone.text_model"].lr_mult == 0.01 and o.custom_keys["logit_scale"].weight_decay == 0
    a = cfg.augment
    assert (a.mosaic, a.mixup_prob, a.close_mosaic_epochs, a.scaling_ratio_range) == (True, 0.15, 4, (0.5, 1.5))
    assert (cfg.amp, cfg.ema, cfg.data.image_size) == (False, False, 640)
    assert cfg.open_vocab == (flavour != "closed_set")
    if flavour == "closed_set":
        assert cfg.class_embeddings == "coco_text_embeddings.npy"


def test_overrides_are_typed_and_validated(tmp_path: Path) -> None:
    assert parse_override("optim.lr=0.5") == (["optim", "lr"], 0.5)
    assert load_config("synth_nano", ["optim.lr=1e-4"]).optim.lr == 1e-4  # YAML 1.1 string, coerced by type
    assert parse_override("augment.scaling_ratio_range=[0.8, 1.2]")[1] == [0.8, 1.2]
    cfg = load_config("synth_nano", ["optim.lr=3e-3", "augment.mosaic=false", "epochs=3"], batch_size=2)
    assert (cfg.optim.lr, cfg.augment.mosaic, cfg.epochs, cfg.batch_size) == (3e-3, False, 3, 2)
    assert load_config("synth_nano", [], seed=None).seed is None  # None keyword values leave the file alone
    with pytest.raises(ConfigError, match="optim.lrr: Extra inputs"):
        load_config("synth_nano", ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="epochs"):
        load_config("synth_nano", ["epochs=zero"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config("synth_nano", ["epochs"])
    with pytest.raises(ConfigError, match="shipped configs: .*synth_nano"):
        load_config(tmp_path / "missing.yaml")


def test_yaml_file_round_trip(tmp_path: Path) -> None:
    cfg = load_config("synth_nano", ["optim.custom_keys.neck={lr_mult: 2.0}"])
    assert cfg.optim.custom_keys["neck"].lr_mult == 2.0
    cfg = load_config("synth_nano", ['optim.custom_keys."backbone.text_model".lr_mult=0.5'])
    assert cfg.optim.custom_keys["backbone.text_model"].lr_mult == 0.5
    path = tmp_path / "c.yaml"
    path.write_text(cfg.dump(), encoding="utf-8")
    assert load_config(path) == cfg
    path.write_text("flavour: [unclosed", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
