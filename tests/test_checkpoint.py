"""Checkpoint loading: formats, strictness, kind and size detection, saving in the official layout."""
from __future__ import annotations

import json

import pytest
import torch

from paths import FIXTURES
from wedetect import CheckpointError, WeDetect, WeDetectError, WeDetectUni
from wedetect.checkpoint import (build_from_checkpoint, detect_kind, detect_size, load_into, official_state_dict,
                                 read_state_dict, resolve_path)
from wedetect.config import get_config
from wedetect.models.detector import WeDetectModel


def _meta_state_dict(keys_name: str) -> dict[str, torch.Tensor]:
    spec = json.loads((FIXTURES / keys_name).read_text())
    return {k: torch.empty(v["shape"], device="meta") for k, v in spec.items()}


@pytest.mark.parametrize("keys_name, kind, size", [
    ("keys_detector_tiny.json", "detector", "tiny"),
    ("keys_detector_base.json", "detector", "base"),
    ("keys_detector_large.json", "detector", "large"),
    ("keys_uni_base.json", "uni", "base"),
    ("keys_uni_large.json", "uni", "large"),
])
def test_kind_and_size_detected_from_shapes(keys_name, kind, size):
    sd = _meta_state_dict(keys_name)
    assert detect_kind(sd) == kind
    assert detect_size(sd) == size


def test_not_a_wedetect_checkpoint(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}}, path)
    with pytest.raises(CheckpointError, match="not a WeDetect checkpoint"):
        WeDetect.from_pretrained(path)
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable"):
        read_state_dict(bad)
    with pytest.raises(CheckpointError, match="not found"):
        WeDetect.from_pretrained(tmp_path / "missing.pth")
    ref_folder = tmp_path / "wedetect_ref_2b"
    ref_folder.mkdir()
    (ref_folder / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="--ref-checkpoint"):
        WeDetect.from_pretrained(ref_folder)


def test_hub_spec_offline_says_what_to_download(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match=r"Download wedetect_base\.pth from https://huggingface\.co/someorg/WeDetect"):
        resolve_path("someorg/WeDetect/wedetect_base.pth")


@pytest.fixture(scope="module")
def tiny_official(official_checkpoint):
    return official_checkpoint("keys_detector_tiny.json")


@pytest.fixture(scope="module")
def tiny_state_dict(tiny_official):
    return read_state_dict(tiny_official)


@pytest.fixture(scope="module")
def tiny_model():
    from wedetect.checkpoint import _no_init

    with _no_init():
        return WeDetectModel(get_config("tiny"))


def test_strict_load_lists_missing_unexpected_and_mismatched(tiny_state_dict, tiny_model):
    sd = dict(tiny_state_dict)
    del sd["neck.Rep_p4.m.conv1.alpha"]
    sd["neck.extra_layer.weight"] = torch.zeros(1)
    sd["bbox_head.head_module.cls_preds.0.2.bias"] = torch.zeros(5)
    with pytest.raises(CheckpointError) as err:
        load_into(tiny_model, sd)
    msg = str(err.value)
    assert "missing keys: neck.Rep_p4.m.conv1.alpha" in msg
    assert "unexpected keys: neck.extra_layer.weight" in msg
    assert "bbox_head.head_module.cls_preds.0.2.bias: checkpoint (5,) vs model (768,)" in msg


def test_known_unused_keys_dropped_silently_and_saved_back(tiny_state_dict, tiny_model):
    unused = load_into(tiny_model, dict(tiny_state_dict))
    assert sorted(unused) == sorted(k for k in tiny_state_dict if k.startswith("backbone.image_model.model.norm.")
                                    or k.startswith("backbone.image_model.model.head."))
    tiny_model.unused_official_state = unused
    back = official_state_dict(tiny_model)
    assert sorted(back) == sorted(tiny_state_dict)  # every official key, no extras
    for k in ("neck.Rep_p4.m.conv1.alpha", "backbone.text_model.head.weight", "bbox_head.head_module.cls_contrasts.1.bias"):
        assert torch.equal(back[k], tiny_state_dict[k])


@pytest.mark.slow
def test_wrong_kind_gets_a_clear_message(tiny_official, official_checkpoint):
    uni_path = official_checkpoint("keys_uni_base.json")
    with pytest.raises(CheckpointError, match="WeDetect-Uni checkpoint.*--uni-checkpoint"):
        WeDetect.from_pretrained(uni_path)
    with pytest.raises(CheckpointError, match="detector checkpoint.*--checkpoint"):
        WeDetectUni.from_pretrained(tiny_official)
    with pytest.raises(CheckpointError, match="a tiny checkpoint, but size='base'"):
        WeDetect.from_pretrained(tiny_official, size="base")


@pytest.mark.slow
def test_save_round_trip_pth_and_safetensors(tiny_official, tmp_path, demo_image):
    model = WeDetect.from_pretrained(tiny_official)
    emb = torch.nn.functional.normalize(torch.randn(3, 768, generator=torch.Generator().manual_seed(0)), dim=-1)
    model.set_class_embeddings(emb[:2], ["a", "b"], blank_embedding=emb[2])
    ref = model.predict(demo_image, threshold=0.0)[0]
    for name in ("ours.pth", "ours.safetensors"):
        model.save(tmp_path / name)
        raw = torch.load(tmp_path / name) if name.endswith(".pth") else None
        if raw is not None:  # mmengine layout: {'state_dict': ..., 'meta': ...}
            assert set(raw) == {"state_dict", "meta"}
            assert sorted(raw["state_dict"]) == sorted(read_state_dict(tiny_official))
        again = WeDetect.from_pretrained(tmp_path / name)
        (tmp_path / name).unlink()  # 1.3 GB each
        again.set_class_embeddings(emb[:2], ["a", "b"], blank_embedding=emb[2])
        out = again.predict(demo_image, threshold=0.0)[0]
        assert torch.equal(out.boxes, ref.boxes) and torch.equal(out.scores, ref.scores)


@pytest.mark.slow
@pytest.mark.parity
def test_large_checkpoint_builds_loads_and_runs(official_checkpoint, demo_image, tmp_path):
    """No Large fixture exists: load the official Large layout strictly and check the 1280 path."""
    path = official_checkpoint("keys_detector_large.json")
    ckpt_model = build_from_checkpoint(__import__("wedetect").load_official(path, "detector"))
    official_checkpoint.release("keys_detector_large.json")  # 3.2 GB on disk, no other test uses it
    assert ckpt_model.config.name == "large" and ckpt_model.config.input_size == 1280
    assert ckpt_model.text_tower.encoder.config.hidden_size == 1024
    model = WeDetect(ckpt_model)
    ids = torch.tensor([[0, 5, 6, 2], [0, 2, 1, 1]])
    text = model.encode_token_ids(ids, (ids != 1).long())
    assert text.shape == (2, 768)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(2))
    model.set_class_embeddings(text[:1], ["x"], blank_embedding=text[1])
    from wedetect.data.io import load_bgr
    from wedetect.data.letterbox import letterbox_detector, to_tensor

    rgb, meta = letterbox_detector(load_bgr(demo_image), 1280)
    assert rgb.shape == (1280, 1280, 3) and meta.scale == (1.0, 1.0)
    logits, boxes = model.forward_raw(to_tensor([rgb]))
    assert logits.shape == (1, 160 * 160 + 80 * 80 + 40 * 40, 2) and boxes.shape[1] == 33600
    det = model.predict(demo_image, threshold=0.0, max_detections=300, keep_blank=True)[0]
    assert 0 < len(det) <= 300
    assert (det.boxes[:, 2] <= 1280).all() and (det.boxes[:, 3] <= 720).all() and (det.boxes >= 0).all()


@pytest.mark.slow
def test_closed_set_checkpoint_loads_with_its_classes(tiny_state_dict, tmp_path, demo_image):
    """Closed-set training writes vision keys + a fixed (K, 768) classifier `embeddings` (mmengine dict)."""
    sd = {k: v for k, v in tiny_state_dict.items() if not k.startswith("backbone.text_model.")}
    sd["embeddings"] = torch.nn.functional.normalize(torch.randn(2, 768, generator=torch.Generator().manual_seed(1)), dim=-1)
    path = tmp_path / "closed.pth"
    torch.save({"state_dict": sd, "meta": {"dataset_meta": {"classes": ["shoe", "bed"]}}}, path)
    model = WeDetect.from_pretrained(path)
    assert model.class_names == ["shoe", "bed"] and model.model.text_tower is None
    det = model.predict(demo_image, threshold=0.0, max_detections=300)[0]
    assert len(det) > 0 and set(det.names) <= {"shoe", "bed"}
    with pytest.raises(WeDetectError, match="closed-set"):
        model.set_classes(["x"])
    with pytest.raises(CheckpointError, match="closed-set WeDetect checkpoint"):
        WeDetectUni.from_pretrained(path)
    renamed = WeDetect.from_pretrained(path, class_names=["鞋", "床"])
    assert renamed.predict(demo_image, threshold=0.0)[0].names[0] in {"鞋", "床"}
    _closed_set_evaluates_without_a_class_file(path, demo_image, tmp_path)
    # Our own safetensors file keeps the kind (a flat file would otherwise read as Uni).
    model.save(tmp_path / "closed.safetensors")
    again = WeDetect.from_pretrained(tmp_path / "closed.safetensors", class_names=["shoe", "bed"])
    out = again.predict(demo_image, threshold=0.0, max_detections=300)[0]
    assert torch.equal(out.boxes, det.boxes) and torch.equal(out.scores, det.scores)


def _closed_set_evaluates_without_a_class_file(checkpoint, image, tmp_path) -> None:
    """`wedetect eval detection` on a closed-set checkpoint: its classifier rows are the categories."""
    from typer.testing import CliRunner

    from wedetect.cli import app

    def dataset(categories: list[str]):
        path = tmp_path / f"ann{len(categories)}.json"
        path.write_text(json.dumps({
            "images": [{"id": 1, "file_name": image.name, "height": 720, "width": 1280}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [100, 100, 200, 300],
                             "area": 60000, "iscrowd": 0}],
            "categories": [{"id": i + 1, "name": n} for i, n in enumerate(categories)],
        }))
        return path

    args = ["eval", "detection", "--checkpoint", str(checkpoint), "--images", str(image.parent), "--device", "cpu"]
    ok = CliRunner().invoke(app, [*args, "--dataset", str(dataset(["shoe", "bed"])),
                                  "--output-dir", str(tmp_path / "eval"), "--json", "-"])
    assert ok.exit_code == 0, ok.output
    rows = json.loads((tmp_path / "eval" / "detections.bbox.json").read_text())
    assert rows and {r["category_id"] for r in rows} <= {1, 2}
    bad = CliRunner().invoke(app, [*args, "--dataset", str(dataset(["a", "b", "c"])),
                                   "--output-dir", str(tmp_path / "eval3")])
    assert bad.exit_code != 0 and "closed-set checkpoint" in bad.output and "Traceback" not in bad.output
    # A class file passed anyway must agree with the checkpoint's class count.
    names = tmp_path / "names3.json"
    names.write_text(json.dumps([["鞋"], ["床"], ["桌子"]], ensure_ascii=False), encoding="utf-8")
    wrong = CliRunner().invoke(app, [*args, "--dataset", str(dataset(["shoe", "bed"])), "--classes-file", str(names),
                                     "--output-dir", str(tmp_path / "eval4")])
    assert wrong.exit_code != 0 and "has 3 classes, the closed-set checkpoint" in wrong.output
