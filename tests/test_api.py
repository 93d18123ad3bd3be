"""The public Python API on the official tiny layout: classes, batching, inputs, errors, precision."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from wedetect import WeDetect, WeDetectError
from wedetect.data.io import ImageReadError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model(official_checkpoint, tiny_tokenizer):
    return WeDetect.from_pretrained(official_checkpoint("keys_detector_tiny.json"), tokenizer=tiny_tokenizer)


def _same(a, b):
    assert len(a) == len(b)
    torch.testing.assert_close(a.boxes, b.boxes, rtol=0, atol=1e-4)
    torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=1e-5)
    assert torch.equal(a.labels, b.labels) and a.names == b.names


def test_set_classes_appends_blank_and_results_drop_it(model, demo_image):
    model.set_classes(["鞋", "床"])
    assert model.class_names == ["鞋", "床"]
    assert model._prompts == ["鞋", "床", " "]
    emb = model.encode_text(["鞋", "床", " "])
    torch.testing.assert_close(model._class_embeds, emb)
    assert (model.predict(demo_image, threshold=0.0, max_detections=300)[0].labels < 2).all()
    # A blank prompt identical to class 0 scores every box of class 0 again, under its own label.
    model.set_class_embeddings(emb[:2], ["鞋", "床"], blank_embedding=emb[0])
    raw = model.predict(demo_image, threshold=0.0, max_detections=300, keep_blank=True)[0]
    assert (raw.labels == 2).any()
    shown = model.predict(demo_image, threshold=0.0, max_detections=300)[0]
    assert set(shown.names) <= {"鞋", "床"} and (shown.labels < 2).all()
    assert len(shown) == int((raw.labels < 2).sum())
    assert shown.image_size == (720, 1280) and shown.path == str(demo_image)


def test_text_embeddings_are_unit_length_and_cached(model):
    emb = model.encode_text(["鞋", "床", " "])
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    assert model.encode_text(["鞋", "床", " "]) is emb
    # The official code tokenises all prompts together; each prompt's embedding must not depend on order.
    swapped = model.encode_text(["床", "鞋", " "])
    torch.testing.assert_close(swapped[[1, 0, 2]], emb, rtol=0, atol=1e-5)


def test_threshold_and_max_detections(model, demo_image):
    model.set_classes(["鞋", "床"])
    all_dets = model.predict(demo_image, threshold=0.0, max_detections=300)[0]
    thr = float(all_dets.scores.median())
    some = model.predict(demo_image, threshold=thr, max_detections=300)[0]
    assert (some.scores > thr).all() and len(some) == int((all_dets.scores > thr).sum())
    top = model.predict(demo_image, threshold=0.0, max_detections=5)[0]
    assert len(top) == 5 and torch.equal(top.scores, all_dets.scores[:5])


def test_paths_pil_and_arrays_batched_agree(model, demo_image, shapes_image):
    model.set_classes(["红色", "圆形"])
    singles = [model.predict(p, threshold=0.0)[0] for p in (demo_image, shapes_image)]
    rgb = np.asarray(Image.open(shapes_image).convert("RGB"))
    batch = model.predict([demo_image, Image.open(shapes_image), rgb], threshold=0.0, batch_size=3)
    _same(batch[0], singles[0])
    _same(batch[1], singles[1])
    _same(batch[2], singles[1])
    assert batch[2].path == "<image 2>"


def test_bad_input_errors(model, tmp_path, demo_image):
    fresh = WeDetect(model.model, tokenizer=None)
    with pytest.raises(WeDetectError, match="set_classes"):
        fresh.predict(demo_image)
    with pytest.raises(WeDetectError, match="no tokenizer given.*--tokenizer"):
        fresh.set_classes(["鞋"])
    for bad in ([], ["鞋", ""], ["鞋", 3]):
        with pytest.raises(WeDetectError):
            model.set_classes(bad)
    with pytest.raises(WeDetectError, match=r"\(len\(names\)=2, 768\)"):
        model.set_class_embeddings(torch.zeros(3, 768), ["a", "b"])
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8garbage")
    model.set_classes(["鞋"])
    with pytest.raises(ImageReadError, match="broken.jpg"):
        model.predict([demo_image, broken])
    out = model.predict([broken, demo_image], on_error="skip", threshold=0.0, keep_blank=True)
    assert out[0].error and "broken.jpg" in out[0].error and len(out[0]) == 0
    assert out[1].error is None and len(out[1]) > 0
    with pytest.raises(WeDetectError, match="dtype"):
        WeDetect(model.model, dtype="int8")
    with pytest.raises(WeDetectError, match="CUDA is not available"):
        if not torch.cuda.is_available():
            WeDetect(model.model, device="cuda")
        else:
            raise WeDetectError("CUDA is not available (skipped on GPU machines)")


def test_classes_and_numbers_are_checked(model, demo_image):
    model.set_classes("鞋床")  # one string is one class, not one class per character
    assert model.class_names == ["鞋床"]
    with pytest.raises(WeDetectError, match="string or a list of strings"):
        model.set_classes(None)
    with pytest.warns(UserWarning, match="more than once: 鞋"):
        model.set_classes(["鞋", "床", "鞋"])
    assert model.class_names == ["鞋", "床", "鞋"]  # kept: official lists (LVIS) repeat names
    for bad in (0, -1, 2.5, True):
        with pytest.raises(WeDetectError, match="max_detections must be a positive integer"):
            model.predict(demo_image, max_detections=bad)
        with pytest.raises(WeDetectError, match="batch_size must be a positive integer"):
            model.predict(demo_image, batch_size=bad)


def test_unsupported_image_objects_are_reported_per_image(model, demo_image):
    model.set_classes(["鞋"])
    with pytest.raises(ImageReadError, match="unsupported image type Tensor"):
        model.predict(torch.zeros(3, 64, 64))
    with pytest.raises(ImageReadError, match="unsupported image type bytes"):
        model.predict(open(demo_image, "rb").read())
    out = model.predict([None, demo_image], on_error="skip", threshold=0.0)
    assert "unsupported image type NoneType" in out[0].error and out[1].error is None and len(out[1]) > 0


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
@pytest.mark.parametrize("dtype, score_tol", [("bfloat16", 0.05), ("float16", 0.01)])
def test_half_precision_close_to_float32(official_checkpoint, tiny_tokenizer, demo_image, dtype, score_tol, device):
    """Documented tolerance: fp16 scores within 0.01 and bf16 within 0.05 of fp32 (CPU) for the top
    boxes, and the top detections overlap their fp32 counterparts (IoU > 0.9)."""
    from torchvision.ops import box_iou

    ref_model = WeDetect.from_pretrained(official_checkpoint("keys_detector_tiny.json"), tokenizer=tiny_tokenizer)
    ref_model.set_classes(["鞋", "床"])
    ref = ref_model.predict(demo_image, threshold=0.0, max_detections=20)[0]
    half = WeDetect(copy.deepcopy(ref_model.model), tokenizer=ref_model.tokenizer, dtype=dtype, device=device)
    half.set_classes(["鞋", "床"])
    out = half.predict(demo_image, threshold=0.0, max_detections=20)[0]
    assert out.boxes.dtype == torch.float32
    # Clamped zero-area boxes have no IoU (0/0): match those by coordinates.
    iou = box_iou(ref.boxes[:10], out.boxes).nan_to_num(0.0)
    near = (ref.boxes[:10, None] - out.boxes[None]).abs().amax(-1) < 2.0
    same_label = ref.labels[:10, None] == out.labels[None, :]
    best = ((iou > 0.9) | near).logical_and(same_label).float().max(dim=1)
    assert (best.values == 1).all()
    assert (ref.scores[:10] - out.scores[best.indices]).abs().max() < score_tol
