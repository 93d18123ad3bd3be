"""The training commands: synth data, train from a config, finetune flags, class embeddings, bad input."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from wedetect.cli.train import app

runner = CliRunner()


def test_data_synth_writes_a_coco_dataset(tmp_path: Path) -> None:
    res = runner.invoke(app, ["data", "synth", "--output", str(tmp_path / "d"), "--train", "3", "--val", "2",
                              "--size", "64", "--colors", "red,blue", "--shapes", "circle,star", "-q"])
    assert res.exit_code == 0, res.output
    ann = json.loads((tmp_path / "d" / "annotations" / "train.json").read_text(encoding="utf-8"))
    assert len(ann["images"]) == 3 and [c["name"] for c in ann["categories"]] == ["红色圆形", "红色星形", "蓝色圆形", "蓝色星形"]
    for a in ann["annotations"]:
        x, y, w, h = a["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 64 and y + h <= 64 and a["area"] > 0
        assert len(a["segmentation"][0]) >= 6
    names = json.loads((tmp_path / "d" / "class_names.json").read_text(encoding="utf-8"))
    assert names[0] == ["红色圆形", "红圆"]
    assert all((tmp_path / "d" / "train" / im["file_name"]).is_file() for im in ann["images"])


def test_data_synth_rejects_unknown_shapes(tmp_path: Path) -> None:
    res = runner.invoke(app, ["data", "synth", "--output", str(tmp_path), "--shapes", "blob"])
    assert res.exit_code != 0 and "unknown colour/shape" in res.output


def test_finetune_reports_bad_input_in_one_line(tmp_path: Path) -> None:
    res = runner.invoke(app, ["finetune", "--checkpoint", "x.pth", "--train", str(tmp_path / "none.json"),
                              "--train-images", str(tmp_path), "--output", str(tmp_path / "run")])
    assert res.exit_code == 2
    assert "annotation file not found" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["finetune", "--checkpoint", "x.pth", "--train", "a.json", "--train-images", ".",
                              "--output", "o", "--flavour", "closed-set"])
    assert res.exit_code == 2 and "--class-embeddings" in res.output
    res = runner.invoke(app, ["train", "synth_nano", "--set", "optim.nope=1"])
    assert res.exit_code == 2 and "optim.nope" in res.output


@pytest.mark.slow
def test_train_config_then_class_embeddings_then_closed_set_finetune(synth_data: dict, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    common = ["--set", "data.image_size=64", "--set", "batch_size=2", "--set", "max_iters_per_epoch=2",
              "--set", "data.num_workers=0", "--set", "epochs=1"]
    res = runner.invoke(app, [
        "train", "synth_nano", "-q", "--output", str(tmp_path / "ov"), "--device", "cpu", "--seed", "1",
        "--set", f"data.train_ann={synth_data['train']}", "--set", f"data.train_images={synth_data['root'] / 'train'}",
        "--set", f"data.val_ann={synth_data['val']}", "--set", f"data.val_images={synth_data['root'] / 'val'}",
        "--set", f"tokenizer={synth_data['tokenizer']}", *common])
    assert res.exit_code == 0, res.output
    ckpt = tmp_path / "ov" / "epoch_1.pth"
    assert ckpt.is_file() and (tmp_path / "ov" / "train.log").is_file()

    res = runner.invoke(app, ["class-embeddings", "--checkpoint", str(ckpt), "--classes-file", str(synth_data["classes"]),
                              "--tokenizer", str(synth_data["tokenizer"]), "--output", str(tmp_path / "e.npy"),
                              "--device", "cpu"])
    assert res.exit_code == 0, res.output
    emb = np.load(tmp_path / "e.npy")
    assert emb.shape == (9, 64)

    res = runner.invoke(app, [
        "finetune", "--checkpoint", str(ckpt), "--train", str(synth_data["train"]),
        "--train-images", str(synth_data["root"] / "train"), "--val", str(synth_data["val"]),
        "--val-images", str(synth_data["root"] / "val"), "--classes-file", str(synth_data["classes"]),
        "--flavour", "closed-set", "--class-embeddings", str(tmp_path / "e.npy"), "--config", "synth_nano",
        "--epochs", "1", "--batch-size", "2", "--lr", "1e-3", "--output", str(tmp_path / "cs"), "--device", "cpu",
        "-q", *common])
    assert res.exit_code == 0, res.output
    saved = torch.load(tmp_path / "cs" / "epoch_1.pth", map_location="cpu", weights_only=True)
    assert saved["state_dict"]["embeddings"].shape == (9, 64)
    assert "flavour: closed_set" in saved["meta"]["cfg"] and "lr: 0.001" in saved["meta"]["cfg"]
