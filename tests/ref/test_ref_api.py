"""WeDetect-Ref public API: loading/saving checkpoints, bad input, proposal pipeline, query reuse."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from wedetect.errors import WeDetectError
from wedetect.models.ref import (
    OFFICIAL_ARCHITECTURE,
    RefCheckpointError,
    RefInputError,
    image_position_sine,
    sine_encode,
)
from wedetect.ref import NoProposalsError, WeDetectRef, smart_resize
from wedetect.structures import Detections

# A small visual-token budget keeps every vision pass cheap; the official 900-1600 is in the parity tests.
FAST = dict(min_visual_tokens=16, max_visual_tokens=48)
BOXES = np.array([[4.0, 6.0, 40.0, 30.0], [20.5, 10.25, 60.0, 47.0], [0.0, 0.0, 64.0, 48.0]], dtype=np.float32)


@pytest.fixture
def ref(tiny_model_and_processor) -> WeDetectRef:
    model, processor = tiny_model_and_processor
    return WeDetectRef(model, processor, **FAST)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)


class FakeUni:
    """Stands in for WeDetectUni: fixed proposals, records how it was called."""

    def __init__(self, boxes: np.ndarray):
        self.boxes = torch.as_tensor(boxes)
        self.calls: list[dict] = []

    def propose(self, images, num_proposals=300, **kwargs):
        self.calls.append({"images": images, "num_proposals": num_proposals, **kwargs})
        n = len(self.boxes)
        return [
            Detections(boxes=self.boxes.clone(), scores=torch.ones(n), labels=torch.zeros(n, dtype=torch.long))
            for _ in images
        ]


def _copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------------------ unit pieces
def test_smart_resize_matches_official_budget() -> None:
    assert smart_resize(480, 640) == (832, 1120)  # small images are upscaled to >= 900 tokens
    assert smart_resize(200, 300) == (800, 1184)
    h, w = smart_resize(3000, 4000)  # large ones shrink to <= 1600 tokens
    assert h % 32 == 0 and w % 32 == 0 and h * w <= 1600 * 32 * 32 and h * w > 1500 * 32 * 32
    with pytest.raises(WeDetectError, match="aspect ratio"):
        smart_resize(10, 2500)


def test_sine_encoding_interleaves_sin_cos() -> None:
    u = torch.tensor([0.3])
    enc = sine_encode(u, 8)[0]
    freqs = [10000 ** (2 * (j // 2) / 8) for j in range(8)]
    expected = [(math.sin if j % 2 == 0 else math.cos)(2 * math.pi * 0.3 / freqs[j]) for j in range(8)]
    torch.testing.assert_close(enc, torch.tensor(expected), atol=1e-6, rtol=0)
    # grid encoding: y first, positions r/H' + 0.5 (not (r + 0.5)/H')
    grid = image_position_sine(2, 3, 8)
    torch.testing.assert_close(grid[5, :4], sine_encode(torch.tensor([1 / 2 + 0.5]), 4)[0])
    torch.testing.assert_close(grid[5, 4:], sine_encode(torch.tensor([2 / 3 + 0.5]), 4)[0])


# ----------------------------------------------------------------------------------- bad input
def test_empty_query_is_rejected(ref, image) -> None:
    for query in ("", "   "):
        with pytest.raises(WeDetectError, match="non-empty"):
            ref.score(image, query, BOXES)
        with pytest.raises(WeDetectError, match="non-empty"):
            ref.predict([image], [query], boxes=[BOXES])


def test_query_with_object_token_is_rejected(ref, image) -> None:
    with pytest.raises(RefInputError, match="<object>"):
        ref.score(image, "the <object> here", BOXES)
    with pytest.raises(RefInputError, match="the query 'the <object> here' contains special tokens"):
        ref.predict([image], ["a cat", "the <object> here"], boxes=[BOXES])


def test_predict_arguments_are_checked(ref, image) -> None:
    for bad in (0, -2, 1.5):
        with pytest.raises(WeDetectError, match="batch_size must be a positive integer"):
            ref.predict([image], "a cat", boxes=[BOXES], batch_size=bad)
    with pytest.raises(WeDetectError, match="unsupported image type Tensor"):
        ref.predict(torch.zeros(3, 48, 64), "a cat", boxes=[BOXES])  # one image, not three
    [det] = ref.predict((im for im in [image]), "a cat", boxes=[BOXES])  # any iterable of images
    assert len(det) == 1


def test_no_proposals_is_an_error(ref, image) -> None:
    with pytest.raises(NoProposalsError):
        ref.score(image, "a cat", np.zeros((0, 4), np.float32))
    ref.uni = FakeUni(np.zeros((0, 4), np.float32))
    with pytest.raises(NoProposalsError, match="no proposals"):
        ref.predict([image], "a cat")


def test_no_proposer_and_no_boxes(ref, image) -> None:
    with pytest.raises(WeDetectError, match="WeDetect-Uni"):
        ref.predict([image], "a cat")


def test_too_many_proposals(ref, image) -> None:
    boxes = np.tile(BOXES[:1], (101, 1))
    with pytest.raises(RefInputError, match="at most 100"):
        ref.score(image, "a cat", boxes)
    small = WeDetectRef(ref.model, ref.processor, max_proposals=2, **FAST)
    with pytest.raises(RefInputError, match="at most 2"):
        small.score(image, "a cat", BOXES)


@pytest.mark.parametrize(
    "boxes,match",
    [
        (np.zeros((2, 3), np.float32), "shape"),
        (np.array([[0, 0, np.nan, 4]], np.float32), "NaN"),
        (np.array([[10, 0, 5, 4]], np.float32), "x2 >= x1"),
    ],
)
def test_malformed_boxes(ref, image, boxes, match) -> None:
    with pytest.raises(RefInputError, match=match):
        ref.score(image, "a cat", boxes)


def test_bad_images(ref, tmp_path) -> None:
    with pytest.raises(WeDetectError, match="not found"):
        ref.score(tmp_path / "missing.jpg", "a cat", BOXES)
    with pytest.raises(WeDetectError, match="uint8"):
        ref.score(np.zeros((8, 8, 3), np.float32), "a cat", BOXES)


# ---------------------------------------------------------------------------------- checkpoints
def test_missing_checkpoint_folder(tmp_path) -> None:
    with pytest.raises(WeDetectError, match="not found"):
        WeDetectRef.from_pretrained(tmp_path / "nope")
    (tmp_path / "detector.pth").write_bytes(b"x")
    with pytest.raises(WeDetectError, match="is a file: give the Hugging Face-layout folder"):
        WeDetectRef.from_pretrained(tmp_path / "detector.pth")


def _rewrite_weights(folder: Path, edit) -> None:
    tensors = load_file(str(folder / "model.safetensors"))
    save_file(edit(tensors), str(folder / "model.safetensors"), metadata={"format": "pt"})


def test_stage2_checkpoint_without_out_proj(tiny_ref_dir, tmp_path) -> None:
    folder = _copy_checkpoint(tiny_ref_dir, tmp_path / "stage2")
    _rewrite_weights(folder, lambda t: {k: v for k, v in t.items() if not k.startswith("out_proj.")})
    with pytest.raises(RefCheckpointError, match="stage-2"):
        WeDetectRef.from_pretrained(folder)


def test_plain_qwen3vl_checkpoint(tiny_ref_dir, tmp_path) -> None:
    folder = _copy_checkpoint(tiny_ref_dir, tmp_path / "plain")
    stock = ("model.visual.", "model.language_model.")
    _rewrite_weights(folder, lambda t: {k: v for k, v in t.items() if k.startswith(stock)})
    with pytest.raises(RefCheckpointError, match="plain Qwen3-VL"):
        WeDetectRef.from_pretrained(folder)


@pytest.mark.parametrize("edit,match", [
    (lambda t: {**t, "model.extra_head.weight": torch.zeros(2)}, "unexpected"),
    (lambda t: {k: v for k, v in t.items() if k != "model.language_model.norm.weight"}, "missing"),
    (lambda t: {**t, "model.merge.bias": torch.zeros(3)}, "model.merge.bias .3,. in the checkpoint"),
])
def test_strict_loading(tiny_ref_dir, tmp_path, edit, match) -> None:
    folder = _copy_checkpoint(tiny_ref_dir, tmp_path / "edited")
    _rewrite_weights(folder, edit)
    with pytest.raises(RefCheckpointError, match=match):
        WeDetectRef.from_pretrained(folder)


def test_tokenizer_without_object_token(tiny_ref_dir, tmp_path) -> None:
    folder = _copy_checkpoint(tiny_ref_dir, tmp_path / "noobj")
    tok = json.loads((folder / "tokenizer.json").read_text())
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] != "<object>"]
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["added_tokens_decoder"] = {k: v for k, v in cfg["added_tokens_decoder"].items() if v["content"] != "<object>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    (folder / "added_tokens.json").unlink()
    with pytest.raises(RefCheckpointError, match="<object>"):
        WeDetectRef.from_pretrained(folder)


def test_save_load_round_trip(ref, tiny_ref_dir, image, tmp_path) -> None:
    ref.save_pretrained(tmp_path / "saved")
    saved = tmp_path / "saved"
    config = json.loads((saved / "config.json").read_text())
    assert config["architectures"] == [OFFICIAL_ARCHITECTURE]
    assert config["object_token_id"] == ref.model.object_token_id
    keys = set(load_file(str(saved / "model.safetensors")))
    assert keys == set(load_file(str(tiny_ref_dir / "model.safetensors")))  # the official key names, no lm_head
    again = WeDetectRef.from_pretrained(saved, **FAST)
    for name, value in ref.model.state_dict().items():
        torch.testing.assert_close(again.model.state_dict()[name], value, atol=0, rtol=0, msg=name)
    torch.testing.assert_close(again.score(image, "a cat", BOXES), ref.score(image, "a cat", BOXES))


def test_default_attention_is_sdpa_on_cpu(ref) -> None:
    assert ref.model.config._attn_implementation == "sdpa"
    assert ref.model.device.type == "cpu"


# ----------------------------------------------------------------------------------- pipeline
def test_queries_reuse_vision_features(ref, image) -> None:
    calls = []
    handle = ref.model.model.visual.register_forward_hook(lambda *a: calls.append(1))
    try:
        queries = ["a cat", "the red box on the left", "左边的红色盒子"]
        together = ref.score_queries(image, queries, BOXES, query_batch_size=2)  # padded batches
        assert len(calls) == 1, "the vision tower must run once per image"
        prepared = ref.encode(image, BOXES)
        alone = torch.stack([ref.score(prepared, q) for q in queries])
        assert len(calls) == 2
    finally:
        handle.remove()
    assert together.shape == (3, len(BOXES))
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
    assert (together[0] - together[1]).abs().max() > 1e-4, "different queries must give different scores"


@pytest.mark.slow
def test_predict_with_proposer(ref, image) -> None:
    uni = FakeUni(BOXES)
    ref.uni = uni
    images = [image, image[:, ::-1].copy()]
    dets = ref.predict(images, "a cat", progress=True)
    assert len(uni.calls) == 1 and len(uni.calls[0]["images"]) == 2
    assert uni.calls[0]["num_proposals"] == 100 and uni.calls[0]["score_threshold"] == 0.0
    np.testing.assert_array_equal(uni.calls[0]["images"][1], images[1])  # Uni sees the decoded RGB pixels
    for img, det in zip(images, dets):
        scores = ref.score(img, "a cat", BOXES)
        assert len(det) == 1 and det.boxes.dtype == torch.float32
        best = int(scores.argmax())
        torch.testing.assert_close(det.boxes[0], torch.from_numpy(BOXES[best]), atol=0, rtol=0)
        torch.testing.assert_close(det.scores[0], scores[best])
        assert det.image_size == (48, 64) and det.names == ["a cat"] and det.labels.tolist() == [0]


def test_predict_threshold_and_multiple_queries(ref, image) -> None:
    queries = ["a cat", "a dog"]
    scores = ref.score_queries(image, queries, BOXES)
    threshold = float(scores[0].median())
    [per_query] = ref.predict([image], queries, threshold=threshold, boxes=[BOXES])
    assert [d.names[:1] for d in per_query if len(d)] == [[q] for q, d in zip(queries, per_query) if len(d)]
    for label, (det, s) in enumerate(zip(per_query, scores)):
        keep = torch.nonzero(s > threshold).flatten()
        torch.testing.assert_close(det.boxes, torch.from_numpy(BOXES)[keep], atol=0, rtol=0)
        torch.testing.assert_close(det.scores, s[keep])
        assert (det.labels == label).all()
    [[none, _]] = ref.predict([image], queries, threshold=1.0, boxes=[BOXES])
    assert len(none) == 0 and none.boxes.shape == (0, 4)
    # A negative threshold is the official --score_thre -1: the best box only.
    [[best, _]] = ref.predict([image], queries, threshold=-1, boxes=[BOXES])
    torch.testing.assert_close(best.boxes, torch.from_numpy(BOXES)[scores[0].argmax()][None], atol=0, rtol=0)


@pytest.mark.slow
def test_uni_from_a_path_runs_in_float32_whatever_the_ref_dtype(tiny_ref_dir, official_checkpoint) -> None:
    uni = official_checkpoint("keys_uni_base.json")
    ref = WeDetectRef.from_pretrained(tiny_ref_dir, uni=uni, dtype="bfloat16", **FAST)
    assert ref.model.dtype == torch.bfloat16 and ref.uni.dtype == torch.float32
    ref = WeDetectRef.from_pretrained(tiny_ref_dir, uni=uni, uni_dtype="bfloat16", **FAST)
    assert ref.model.dtype == torch.float32 and ref.uni.dtype == torch.bfloat16


def test_bfloat16_runs_close_to_float32(tiny_ref_dir, ref, image) -> None:
    bf16 = WeDetectRef.from_pretrained(tiny_ref_dir, dtype="bfloat16", **FAST)
    assert bf16.model.dtype == torch.bfloat16
    scores = bf16.score(image, "a cat", BOXES)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, ref.score(image, "a cat", BOXES), atol=0.03, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(tiny_ref_dir, ref, image) -> None:
    gpu = WeDetectRef.from_pretrained(tiny_ref_dir, device="cuda", **FAST)
    torch.testing.assert_close(gpu.score(image, "a cat", BOXES), ref.score(image, "a cat", BOXES), atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------- CLI
@pytest.mark.slow
def test_cli_scores_given_boxes(tiny_ref_dir, tmp_path) -> None:
    from typer.testing import CliRunner

    from paths import FIXTURES
    from wedetect.cli import app

    image = FIXTURES / "shapes_300x200.png"
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    boxes = {image.name: [[178, 152, 300, 200], [201, 26, 300, 118], [34, 52, 157, 84]], str(bad): [[0, 0, 1, 1]]}
    (tmp_path / "boxes.json").write_text(json.dumps(boxes))
    out = tmp_path / "out"
    args = ["ref", "--ref-checkpoint", str(tiny_ref_dir), "--image", str(image), "--image", str(bad),
            "--boxes", str(tmp_path / "boxes.json"), "--query", "red rectangle", "--query", "蓝色的圆",
            "--output-dir", str(out), "--device", "cpu", "-q"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "skipped" in result.output and "broken.png" in result.output
    payload = json.loads((out / "ref_results.json").read_text(encoding="utf-8"))
    [entry] = payload["images"]
    assert [s["path"] for s in payload["skipped"]] == [str(bad)]
    assert [q["query"] for q in entry["queries"]] == ["red rectangle", "蓝色的圆"]
    ref = WeDetectRef.from_pretrained(tiny_ref_dir)
    for q in entry["queries"]:
        scores = ref.score(image, q["query"], boxes[image.name])
        best = int(scores.argmax())
        assert q["boxes"] == [boxes[image.name][best]]  # top-1 by default, boxes as given
        assert q["scores"] == pytest.approx([float(scores[best])], abs=1e-6)
    assert (out / "shapes_300x200.jpg").is_file()


def test_cli_usage_and_checkpoint_errors(tiny_ref_dir, tmp_path) -> None:
    from typer.testing import CliRunner

    from paths import FIXTURES
    from wedetect.cli import app

    image = str(FIXTURES / "shapes_300x200.png")
    runner = CliRunner()
    result = runner.invoke(app, ["ref", "--ref-checkpoint", str(tiny_ref_dir), "--image", image, "--query", "x"])
    assert result.exit_code != 0 and "--uni-checkpoint" in result.output
    stage2 = _copy_checkpoint(tiny_ref_dir, tmp_path / "stage2")
    _rewrite_weights(stage2, lambda t: {k: v for k, v in t.items() if not k.startswith("out_proj.")})
    (tmp_path / "b.json").write_text(json.dumps({"shapes_300x200.png": [[0, 0, 10, 10]]}))
    result = runner.invoke(app, ["ref", "--ref-checkpoint", str(stage2), "--image", image, "--query", "x",
                                 "--boxes", str(tmp_path / "b.json"), "--device", "cpu"])
    assert result.exit_code == 2 and "stage-2" in result.output and "Traceback" not in result.output


def test_cli_query_and_boxes_mistakes_are_usage_errors(tiny_ref_dir, tmp_path) -> None:
    """A bad query stops the run with one line (not every image "skipped" and exit 0); an empty one is
    caught before any model loads."""
    from typer.testing import CliRunner

    from paths import FIXTURES
    from wedetect.cli import app

    image = str(FIXTURES / "shapes_300x200.png")
    boxes = tmp_path / "b.json"
    boxes.write_text(json.dumps({"shapes_300x200.png": [[0, 0, 10, 10]]}))
    gbk = tmp_path / "gbk.json"
    gbk.write_bytes(json.dumps({"狗.png": [[0, 0, 1, 1]]}, ensure_ascii=False).encode("gbk"))
    runner = CliRunner()
    for checkpoint, query, box_file, message in (
        (tmp_path / "missing", "   ", boxes, "non-empty expression"),
        (tiny_ref_dir, "the <object> here", boxes, "contains special tokens"),
        (tiny_ref_dir, "a cat", gbk, "gbk.json is not UTF-8 text"),
    ):
        result = runner.invoke(app, ["ref", "--ref-checkpoint", str(checkpoint), "--image", image, "--query", query,
                                     "--boxes", str(box_file), "--device", "cpu", "-q"])
        assert result.exit_code == 2, result.output
        assert result.output.strip().count("\n") == 0 and message in result.output, result.output
    result = runner.invoke(app, ["ref", "--ref-checkpoint", str(tiny_ref_dir), "--image", image, "--query", "x"])
    assert result.exit_code == 2 and result.output.startswith("error: give exactly one of --uni-checkpoint")


def test_fresh_model_uses_the_intended_init(tiny_ref_dir) -> None:
    from transformers import Qwen3VLConfig

    from wedetect.models.ref import WeDetectRefForProposalScoring

    model = WeDetectRefForProposalScoring(Qwen3VLConfig.from_pretrained(tiny_ref_dir))
    assert model.out_proj.bias.item() == pytest.approx(-math.log(99))  # 0.01 prior
    for projector in (model.model.image_pos_projector, model.model.object_pos_projector):
        assert not projector[-1].weight.any() and not projector[-1].bias.any()
        assert projector[0].weight.std() > 0
