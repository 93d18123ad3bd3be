"""`wedetect detect` / `wedetect propose` end to end, and their handling of user mistakes."""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from wedetect.cli import app
from wedetect.errors import WeDetectError

runner = CliRunner()


def _run(*args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_usage_errors_are_one_line(tmp_path, demo_image):
    res = _run("detect", "--checkpoint", tmp_path / "none.pth", "--images", demo_image, "--classes", "鞋")
    assert res.exit_code == 2
    assert res.output.strip().count("\n") == 0 and "none.pth not found" in res.output
    res = _run("detect", "--checkpoint", tmp_path / "none.pth", "--images", tmp_path / "nope", "--classes", "鞋")
    assert res.exit_code == 2 and "no such file or folder" in res.output
    res = _run("detect", "--checkpoint", "x.pth", "--images", demo_image)
    assert res.exit_code == 2 and "exactly one of --classes or --classes-file" in res.output
    assert "Traceback" not in res.output


@pytest.mark.slow
def test_detect_writes_annotated_images_and_coco_json(official_checkpoint, tiny_tokenizer, tmp_path, demo_image, shapes_image):
    images = tmp_path / "imgs"
    images.mkdir()
    shutil.copy(demo_image, images / "demo.jpeg")
    shutil.copy(shapes_image, images / "shapes.png")
    (images / "broken.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "out"
    res = _run("detect", "--checkpoint", official_checkpoint("keys_detector_tiny.json"), "--tokenizer", tiny_tokenizer,
               "--classes", "鞋,床", "--images", images, "--threshold", "0.0", "--output-dir", out,
               "--json", tmp_path / "res.json", "--device", "cpu", "-q")
    assert res.exit_code == 0, res.output
    assert "skipped" in res.output and "broken.png" in res.output
    report = json.loads((tmp_path / "res.json").read_text(encoding="utf-8"))
    assert report["classes"] == ["鞋", "床"]
    assert [s["path"] for s in report["skipped"]] == [str(images / "broken.png")]
    assert len(report["images"]) == 2 and all(len(r["boxes"]) > 0 for r in report["images"])
    rows = json.loads((out / "detections.json").read_text(encoding="utf-8"))
    assert rows and {r["category_name"] for r in rows} <= {"鞋", "床"}
    first = report["images"][0]
    x1, y1, x2, y2 = first["boxes"][0]
    match = [r for r in rows if r["file_name"] == first["path"]][0]
    assert match["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1])
    for name in ("demo.jpg", "shapes.jpg"):
        img = Image.open(out / name)
        assert img.size == Image.open(images / ("demo.jpeg" if name == "demo.jpg" else "shapes.png")).size
    # The annotated image differs from the input where boxes are drawn.
    drawn = np.asarray(Image.open(out / "shapes.jpg").convert("RGB")).astype(int)
    orig = np.asarray(Image.open(images / "shapes.png").convert("RGB")).astype(int)
    assert np.abs(drawn - orig).max() > 100
    # --overlap (post-processing beside the next batch) reports the same detections.
    res = _run("detect", "--checkpoint", official_checkpoint("keys_detector_tiny.json"), "--tokenizer", tiny_tokenizer,
               "--classes", "鞋,床", "--images", images, "--threshold", "0.0", "--overlap", "--batch-size", "1",
               "--json", tmp_path / "overlap.json", "--device", "cpu", "-q")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "overlap.json").read_text(encoding="utf-8")) == report


@pytest.mark.slow
def test_propose_json_to_stdout_and_npz(official_checkpoint, tmp_path, demo_image):
    out = tmp_path / "props"
    res = _run("propose", "--uni-checkpoint", official_checkpoint("keys_uni_base.json"), "--images", demo_image,
               "--threshold", "0.0", "--num-proposals", "50", "--output-dir", out, "--json", "-", "--device", "cpu")
    assert res.exit_code == 0
    report = json.loads(res.stdout)
    assert len(report["images"]) == 1 and len(report["images"][0]["boxes"]) == 50
    saved = np.load(out / "demo.npz")
    assert saved["embeddings"].shape == (50, 768) and saved["levels"].max() <= 2
    np.testing.assert_allclose(saved["boxes"], np.array(report["images"][0]["boxes"], dtype=np.float32), rtol=1e-6)


def test_module_entry_point_lists_every_command():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "wedetect", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for command in ("detect", "propose", "index", "eval", "ref", "train", "finetune", "class-embeddings", "data"):
        assert f" {command} " in out.stdout, command


def test_output_paths_and_inputs_are_checked_before_loading(tmp_path, demo_image):
    """Each mistake is a one-line usage error found before the (missing) checkpoint is even looked at."""
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    gbk = tmp_path / "classes.txt"
    gbk.write_bytes("鞋\n床\n".encode("gbk"))
    none = tmp_path / "none.pth"
    cases = [
        (["--classes", "鞋", "--output-dir", a_file], "--output-dir .*a_file is a file"),
        (["--classes", "鞋", "--json", a_file / "out.json"], "a part of the path is a file"),
        (["--classes", "鞋", "--json", tmp_path], "is a folder"),
        (["--classes", "狗,猫,狗"], "狗 more than once"),
        (["--classes-file", gbk], "classes.txt is not UTF-8 text"),
        (["--classes", "鞋", "--images", demo_image, "--images", tmp_path / "nope.jpg"], "nope.jpg: no such file"),
        (["--classes", "鞋", "--device", "gpu7"], "unknown device 'gpu7'"),
    ]
    for args, message in cases:
        res = _run("detect", "--checkpoint", none, *args)
        assert res.exit_code == 2, (args, res.output)
        assert res.output.strip().count("\n") == 0 and "error:" in res.output, res.output
        assert re.search(message, res.output), (message, res.output)
    res = _run("propose", "--uni-checkpoint", none, "--output-dir", a_file)
    assert res.exit_code == 2 and "is a file" in res.output


def test_click_usage_errors_are_one_line():
    import subprocess
    import sys

    for args, message in ((["detect", "--checkpoint", "x", "--bogus"], "No such option: --bogus"),
                          (["propose", "--uni-checkpoint", "x", "--batch-size", "0"], "'--batch-size'"),
                          (["detect"], "Missing option '--checkpoint'")):
        out = subprocess.run([sys.executable, "-m", "wedetect", *args], capture_output=True, text=True, timeout=120)
        assert out.returncode == 2, out.stderr
        assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: ") and message in out.stderr, out.stderr
        assert f"wedetect {args[0]} --help')" in out.stderr


@pytest.mark.slow
def test_propose_draws_in_its_own_frame_and_skips_thin_images(official_checkpoint, tmp_path, shapes_image):
    """Uni decodes without the EXIF rotation, so its boxes are drawn on the unrotated image; an image too
    thin to letterbox is skipped by name; --images repeats."""
    from wedetect import WeDetectUni

    rotated = tmp_path / "rot.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(shapes_image).convert("RGB").save(rotated, exif=exif.tobytes())
    thin = tmp_path / "thin.png"
    Image.new("RGB", (2000, 1)).save(thin)
    out = tmp_path / "out"
    uni = official_checkpoint("keys_uni_base.json")
    res = _run("propose", "--uni-checkpoint", uni, "--images", rotated, "--images", thin, "--threshold", "0",
               "--num-proposals", "20", "--output-dir", out, "--json", tmp_path / "r.json", "--device", "cpu", "-q")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    [entry] = report["images"]
    assert entry["image_size"] == [200, 300]
    assert report["skipped"] == [{"path": str(thin), "reason": "a 2000x1 image is too thin for a 640 input: "
                                                               "one side would shrink to 0 pixels"}]
    assert Image.open(out / "rot.jpg").size == (300, 200)
    assert f"skipped {thin}: a 2000x1 image" in res.output and "1 image (1 skipped)" in res.output
    with pytest.raises(WeDetectError, match="num_proposals must be a positive integer"):
        WeDetectUni.from_pretrained(uni).propose(shapes_image, num_proposals=0)
