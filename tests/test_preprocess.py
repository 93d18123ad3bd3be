"""Official pre-processing details and robust decoding of real-world files."""
from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from wedetect.data.classnames import class_prompts, load_class_names, parse_classes
from wedetect.data.io import ImageReadError, collect_images, load_bgr, load_pil_rgb
from wedetect.data.letterbox import letterbox_detector, letterbox_uni, to_tensor
from wedetect.errors import WeDetectError

# Long sides below 2139 whose keep-ratio resize lands on S - 1 through float rounding (spec §2).
ROUNDS_DOWN = [77, 154, 303, 308, 319, 581, 606, 616, 623, 638, 1077, 1162, 1212, 1231, 1232, 1239, 1241, 1245,
               1246, 1263, 1269, 1276]


@pytest.mark.parametrize("size", [640, 1280])
def test_long_sides_that_round_to_s_minus_1(size):
    found = []
    for long_side in range(1, 2139):
        if int(long_side * min(size / long_side, size / 1)) != size:
            found.append(long_side)
    assert found == ROUNDS_DOWN
    img = np.zeros((50, 303, 3), np.uint8)
    rgb, meta = letterbox_detector(img, size)
    assert rgb.shape == (size, size, 3)
    h1 = int(50 * (size / 303))
    top = (size - h1) // 2
    assert meta.pad == (top, size - h1 - top, 0.0, 1.0)  # the odd pixel goes right
    assert meta.scale == ((size - 1) / 303, h1 / 50)
    assert (rgb[:, -1] == 114).all() and (rgb[top:top + h1, : size - 1] == 0).all()


def test_upscale_linear_downscale_area_and_identity():
    rng = np.random.default_rng(0)
    small = rng.integers(0, 255, (200, 300, 3), dtype=np.uint8)
    rgb, meta = letterbox_detector(small, 640)
    expected = cv2.resize(small, (640, 426), interpolation=cv2.INTER_LINEAR)[:, :, ::-1]
    np.testing.assert_array_equal(rgb[107:533], expected)
    assert meta.scale == (640 / 300, 426 / 200) and meta.pad == (107.0, 107.0, 0.0, 0.0)
    big = rng.integers(0, 255, (720, 1280, 3), dtype=np.uint8)
    rgb, _ = letterbox_detector(big, 640)
    np.testing.assert_array_equal(rgb[140:500], cv2.resize(big, (640, 360), interpolation=cv2.INTER_AREA)[:, :, ::-1])
    same = rng.integers(0, 255, (640, 640, 3), dtype=np.uint8)
    np.testing.assert_array_equal(letterbox_detector(same, 640)[0], same[:, :, ::-1])


def test_uni_letterbox_uses_pillow_round_and_float_half_pad():
    img = Image.fromarray(np.full((201, 300, 3), 7, np.uint8))
    rgb, meta = letterbox_uni(img, 640)
    new_h = int(round(201 * 640 / 300))  # 429: odd pad 211
    assert meta.pad == ((640 - new_h) / 2,) * 2 + (0.0, 0.0) and meta.scale == (640 / 300,) * 2
    top = (640 - new_h) // 2
    assert (rgb[top:top + new_h] == 7).all() and (rgb[:top] == 114).all() and (rgb[top + new_h:] == 114).all()


def test_to_tensor_divides_by_255():
    x = to_tensor([np.full((2, 2, 3), 255, np.uint8), np.zeros((2, 2, 3), np.uint8)])
    assert x.shape == (2, 3, 2, 2) and x.dtype.is_floating_point and x[0].eq(1).all() and x[1].eq(0).all()


def _png_bytes(arr: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", arr)
    assert ok
    return buf.tobytes()


def test_decoding_grayscale_rgba_16bit_cmyk(tmp_path):
    gray = tmp_path / "g.png"
    gray.write_bytes(_png_bytes(np.full((4, 5), 77, np.uint8)))
    assert load_bgr(gray).shape == (4, 5, 3) and (load_bgr(gray) == 77).all()
    rgba = tmp_path / "a.png"
    Image.fromarray(np.dstack([np.full((4, 5, 3), 9, np.uint8), np.zeros((4, 5), np.uint8)])).save(rgba)
    assert (load_bgr(rgba) == 9).all() and load_pil_rgb(rgba).mode == "RGB"  # alpha dropped, not composited
    deep = tmp_path / "d.png"
    deep.write_bytes(_png_bytes(np.full((4, 5, 3), 65535, np.uint16)))
    assert load_bgr(deep).dtype == np.uint8 and (load_bgr(deep) == 255).all()
    cmyk = tmp_path / "c.jpg"
    Image.new("CMYK", (8, 8), (0, 0, 0, 0)).save(cmyk)
    assert load_bgr(cmyk).shape == (8, 8, 3) and load_bgr(cmyk).min() > 240


def test_exif_orientation_detector_applies_uni_does_not(tmp_path):
    path = tmp_path / "rot.jpg"
    img = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes())
    path.write_bytes(buf.getvalue())
    assert load_bgr(path).shape[:2] == (40, 20)  # OpenCV applies the tag
    assert load_pil_rgb(path).size == (40, 20)  # Pillow path (Uni) does not: width 40, height 20


def test_unreadable_inputs_raise_image_read_error(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "notes.jpg"
    text.write_text("hello")
    for bad in (empty, text, tmp_path / "missing.png"):
        with pytest.raises(ImageReadError, match=bad.name):
            load_bgr(bad)
        with pytest.raises(ImageReadError, match=bad.name):
            load_pil_rgb(bad)
    with pytest.raises(ImageReadError, match="uint8"):
        load_bgr(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ImageReadError, match="shape"):
        load_bgr(np.zeros((4, 4, 5), np.uint8))


def test_arrays_and_pil_are_rgb():
    arr = np.zeros((3, 3, 3), np.uint8)
    arr[..., 0] = 255  # red
    assert (load_bgr(arr)[..., 2] == 255).all() and (load_bgr(Image.fromarray(arr))[..., 2] == 255).all()


def test_collect_images_dir_glob_list(tmp_path):
    for name in ("b.jpg", "a.png", "c.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in collect_images(tmp_path)] == ["a.png", "b.jpg"]
    assert [p.name for p in collect_images(str(tmp_path / "*.jpg"))] == ["b.jpg"]
    lst = tmp_path / "list.txt"
    lst.write_text("# images\nb.jpg\n\n/abs/missing.jpg\n")
    assert collect_images(lst) == [tmp_path / "b.jpg", __import__("pathlib").Path("/abs/missing.jpg")]
    with pytest.raises(WeDetectError, match="no such file"):
        collect_images(tmp_path / "nope")
    with pytest.raises(WeDetectError, match="no files match"):
        collect_images(str(tmp_path / "*.bmp"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeDetectError, match="no image files"):
        collect_images(tmp_path / "empty")


def test_class_names(tmp_path):
    assert parse_classes("鞋, 床，狗") == ["鞋", "床，狗"]  # ASCII commas only, as the official demo
    with pytest.raises(WeDetectError):
        parse_classes("鞋,,床")
    official = tmp_path / "names.json"
    official.write_text('[["滑雪板", "雪橇"], ["人"], "狗"]', encoding="utf-8")
    assert load_class_names(official) == [["滑雪板", "雪橇"], ["人"], ["狗"]]
    assert class_prompts(classes_file=official) == ["滑雪板", "人", "狗"]
    plain = tmp_path / "names.txt"
    plain.write_text("鞋\n\n床\n", encoding="utf-8")
    assert class_prompts(classes_file=plain) == ["鞋", "床"]
    bad = tmp_path / "bad.json"
    bad.write_text('[["ok"], []]')
    with pytest.raises(WeDetectError, match="entry 1"):
        load_class_names(bad)
    with pytest.raises(WeDetectError, match="exactly one"):
        class_prompts("a", official)


def test_16bit_grayscale_keeps_its_high_byte_on_both_decoders(tmp_path):
    """Pillow's own I;16 -> RGB clips every value above 255 (a white image); both paths agree with OpenCV."""
    levels = np.arange(0, 65536, 257, dtype=np.uint16)[:240].reshape(12, 20)
    path = tmp_path / "g16.png"
    Image.fromarray(levels).save(path)
    assert Image.open(path).mode.startswith("I;16")
    expected = (levels >> 8).astype(np.uint8)
    assert (load_bgr(path) == expected[..., None]).all()
    assert (np.asarray(load_pil_rgb(path)) == expected[..., None]).all()
    assert (np.asarray(load_pil_rgb(Image.open(path))) == expected[..., None]).all()


def test_unsupported_image_types_are_image_read_errors():
    for bad in (torch.zeros(3, 8, 8), b"\xff\xd8", None, 3):
        for load in (load_bgr, load_pil_rgb):
            with pytest.raises(ImageReadError, match=f"unsupported image type {type(bad).__name__}"):
                load(bad)


@pytest.mark.parametrize("h, w", [(1, 2000), (2000, 1), (2, 5000)])
def test_images_too_thin_to_letterbox_are_image_read_errors(h, w):
    """The official code crashes in the resize; the error names the size so that the image is skipped."""
    with pytest.raises(ImageReadError, match=f"{w}x{h} image is too thin"):
        letterbox_detector(np.zeros((h, w, 3), np.uint8), 640)
    with pytest.raises(ImageReadError, match=f"{w}x{h} image is too thin"):
        letterbox_uni(Image.new("RGB", (w, h)), 640)
    thicker = (h * 4, w) if h < w else (h, w * 4)  # one pixel or more after the resize
    assert letterbox_detector(np.zeros((*thicker, 3), np.uint8), 640)[0].shape == (640, 640, 3)


def test_text_files_must_be_utf8(tmp_path):
    gbk = tmp_path / "classes.txt"
    gbk.write_bytes("鞋\n床\n".encode("gbk"))
    with pytest.raises(WeDetectError, match=r"class file .*classes.txt is not UTF-8 text \(byte 0x"):
        class_prompts(classes_file=gbk)
    listing = tmp_path / "list.txt"
    listing.write_bytes("a.jpg\n".encode("utf-16"))
    with pytest.raises(WeDetectError, match="image list .*list.txt is not UTF-8"):
        collect_images(listing)
    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeff鞋\n".encode())
    assert class_prompts(classes_file=bom) == ["鞋"]


def test_repeated_class_names_and_several_image_specs(tmp_path):
    with pytest.raises(WeDetectError, match="狗 more than once"):
        parse_classes("狗,猫,狗")
    for name in ("a.jpg", "b.png"):
        (tmp_path / name).write_bytes(b"x")
    assert collect_images([tmp_path / "b.png", str(tmp_path / "*.jpg")]) == [tmp_path / "b.png", tmp_path / "a.jpg"]
    with pytest.raises(WeDetectError, match="nope"):
        collect_images([tmp_path / "a.jpg", tmp_path / "nope"])
