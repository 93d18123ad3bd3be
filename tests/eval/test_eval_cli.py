"""`wedetect eval` commands and the dataset runner (batching, resume, torchrun sharding + gather),
driven by fake models that return known results: these tests check the plumbing, not a network."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from wedetect.cli import eval as eval_cli
from wedetect.errors import WeDetectError
from wedetect.eval.runner import DistContext, ResultCache, ResumeMismatchError, run_over_images
from wedetect.postprocess import PostprocessConfig
from wedetect.structures import Detections

# Three images; category ids are not contiguous, so label k must map to the k-th category of the file.
CATEGORIES = [{"id": 3, "name": "cat", "frequency": "f"}, {"id": 7, "name": "dog", "frequency": "c"}]
IMAGES = [(11, 480, 640), (22, 300, 400), (33, 200, 200)]  # id, height, width
ANNOTATIONS = [  # image id, category id, xywh
    (11, 3, [10.0, 20.0, 100.0, 80.0]),
    (11, 7, [300.0, 200.0, 50.0, 60.0]),
    (22, 7, [0.0, 0.0, 40.0, 40.0]),
]  # image 33 has no annotations


@pytest.fixture
def dataset(tmp_path: Path) -> dict:
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    for image_id, _, _ in IMAGES:
        (images_dir / f"{image_id}.jpg").write_bytes(b"not decoded by the fake models")
    ann = {
        "images": [{"id": i, "height": h, "width": w, "file_name": f"{i}.jpg", "neg_category_ids": [],
                    "not_exhaustive_category_ids": []} for i, h, w in IMAGES],
        "categories": CATEGORIES,
        "annotations": [{"id": n + 1, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
                        for n, (i, c, b) in enumerate(ANNOTATIONS)],
    }  # fmt: skip
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    (tmp_path / "classes.json").write_text(json.dumps([["猫", "cat"], ["狗"]], ensure_ascii=False))
    return {"root": tmp_path, "ann": tmp_path / "ann.json", "images": images_dir, "classes": tmp_path / "classes.json"}


def truth_for(path: Path) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """The ground truth of an image as xyxy boxes and labels (label = category position in the file)."""
    image_id = int(Path(path).stem)
    rows = [(b, [c["id"] for c in CATEGORIES].index(cat)) for i, cat, b in ANNOTATIONS if i == image_id]
    boxes = torch.tensor([[x, y, x + w, y + h] for (x, y, w, h), _ in rows], dtype=torch.float32).reshape(-1, 4)
    labels = torch.tensor([label for _, label in rows], dtype=torch.int64)
    h, w = next((h, w) for i, h, w in IMAGES if i == image_id)
    return boxes, labels, (h, w)


class FakeDetector:
    """Returns every ground-truth box of an image with score 0.9 (perfect detections)."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.classes: tuple[list[str], bool] | None = None
        self.postprocess_cfg = PostprocessConfig(score_thr=0.5, max_per_img=1)  # the CLI must set its own

    def set_classes(self, names, blank=True) -> None:
        self.classes = (list(names), blank)

    def predict(self, images, threshold, max_detections, batch_size):
        assert (threshold, max_detections) == (0.001, 300) and batch_size == len(images)
        assert (self.postprocess_cfg.score_thr, self.postprocess_cfg.max_per_img) == (0.001, 300)
        self.calls.append([Path(p).name for p in images])
        out = []
        for path in images:
            boxes, labels, size = truth_for(path)
            out.append(Detections(boxes, torch.full((len(boxes),), 0.9), labels, image_size=size, path=str(path)))
        return out

    def encode_text(self, names):
        # Class k reads embedding dimension k.
        index = {"猫": 0, "狗": 1}
        return torch.eye(4)[[index[n] for n in names]]


class FakeUni:
    """Proposals = the GT boxes followed by one far-away box; embeddings point at the GT class."""

    def __init__(self) -> None:
        self.calls = 0

    def propose(self, images, num_proposals, score_threshold, batch_size):
        self.calls += 1
        out = []
        for path in images:
            boxes, labels, size = truth_for(path)
            boxes = torch.cat([boxes, torch.tensor([[0.0, 0.0, 1.0, 1.0]])])
            emb = torch.zeros(len(boxes), 4)
            emb[torch.arange(len(labels)), labels] = 5.0  # sigmoid(5) ~ 0.993 for its class, 0.5 otherwise
            n = len(boxes)
            out.append(Detections(boxes, torch.linspace(0.9, 0.1, n), torch.zeros(n, dtype=torch.int64),
                                  image_size=size, embeddings=emb, levels=torch.zeros(n, dtype=torch.int64),
                                  logit_scale=torch.zeros(n), logit_bias=torch.zeros(n)))  # fmt: skip
        return out


@pytest.fixture
def fakes(monkeypatch) -> dict:
    made = {"detector": FakeDetector(), "uni": FakeUni()}
    monkeypatch.setattr(eval_cli, "_load_detector", lambda *args, **kw: made["detector"])
    monkeypatch.setattr(eval_cli, "_load_uni", lambda *args, **kw: made["uni"])
    return made


def invoke(*args: str):
    return CliRunner().invoke(eval_cli.app, [str(a) for a in args])


def detection_args(ds: dict, out: Path, *extra: str) -> list:
    return ["detection", "--dataset", ds["ann"], "--images", ds["images"], "--classes-file", ds["classes"],
            "--checkpoint", ds["root"] / "model.pth", "--output-dir", out, "--quiet", *extra]  # fmt: skip


# ---------------------------------------------------------------- wedetect eval detection


@pytest.mark.parametrize("lvis", [False, True])
def test_detection_perfect_model_scores_one(dataset, fakes, lvis: bool) -> None:
    out = dataset["root"] / "out"
    result = invoke(*detection_args(dataset, out, "--batch-size", "2", *(["--lvis"] if lvis else [])))
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stats"]["AP" if lvis else "mAP"] == pytest.approx(1.0)
    # First synonym of each class file entry, no blank prompt (official evaluation), batches of 2.
    assert fakes["detector"].classes == (["猫", "狗"], False)
    assert fakes["detector"].calls == [["11.jpg", "22.jpg"], ["33.jpg"]]
    rows = json.loads((out / "detections.bbox.json").read_text())
    assert sorted((r["image_id"], r["category_id"], r["bbox"]) for r in rows) == sorted(
        (i, c, b) for i, c, b in ANNOTATIONS
    )
    assert "AP" in (out / "metrics.txt").read_text()


def test_detection_rerun_resumes_from_cache_and_rejects_changed_settings(dataset, fakes) -> None:
    out = dataset["root"] / "out"
    assert invoke(*detection_args(dataset, out)).exit_code == 0
    first = (out / "detections.bbox.json").read_text()
    fakes["detector"].calls.clear()
    assert invoke(*detection_args(dataset, out)).exit_code == 0
    assert fakes["detector"].calls == []  # everything came from the cache
    assert (out / "detections.bbox.json").read_text() == first
    result = invoke(*detection_args(dataset, out, "--blank-prompt"))
    assert result.exit_code == 2 and "different settings (blank_prompt)" in result.output


def test_detection_scores_saved_detections_without_a_model(dataset, tmp_path) -> None:
    dets = [{"image_id": i, "category_id": c, "bbox": b, "score": 0.5} for i, c, b in ANNOTATIONS[:2]]
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    result = invoke("detection", "--dataset", dataset["ann"], "--detections", tmp_path / "dets.json",
                    "--output-dir", tmp_path / "o", "--json", "-")  # fmt: skip
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)["stats"]
    # Category 3 fully found (AP 1); category 7 one of two objects, ranked first (AP 51/101).
    assert stats["mAP"] == pytest.approx((1 + 51 / 101) / 2)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda ds: ds["classes"].write_text(json.dumps([["猫"]])), "1 classes but the dataset has 2 categories"),
        (lambda ds: (ds["images"] / "22.jpg").unlink(), "1 of 3 images not found"),
        (lambda ds: ds["ann"].write_text("{"), "not valid JSON"),
    ],
)
def test_detection_bad_input_fails_with_one_line(dataset, fakes, change, message: str) -> None:
    change(dataset)
    result = invoke(*detection_args(dataset, dataset["root"] / "out"))
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert fakes["detector"].calls == []


def test_detection_requires_a_model_or_saved_detections(dataset, fakes) -> None:
    result = invoke("detection", "--dataset", dataset["ann"], "--output-dir", dataset["root"] / "o")
    assert result.exit_code == 2 and "--checkpoint and --images required" in result.output
    # An open-vocabulary checkpoint needs the class names (a closed-set one brings its own).
    args = [a for a in detection_args(dataset, dataset["root"] / "o") if a != dataset["classes"]]
    result = invoke(*[a for a in args if a != "--classes-file"])
    assert result.exit_code == 2 and "--classes-file required" in result.output
    assert "Traceback" not in result.output and fakes["detector"].calls == []


# ---------------------------------------------------------------- wedetect eval recall / retrieval


def test_recall_cli_and_saved_proposals(dataset, fakes) -> None:
    out = dataset["root"] / "out"
    result = invoke("recall", "--dataset", dataset["ann"], "--images", dataset["images"], "--uni-checkpoint",
                    dataset["root"] / "uni.pth", "--output-dir", out, "--quiet", "--json", "-")  # fmt: skip
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["ar"] == [1.0, 1.0] and payload["total_gt"] == 3
    assert payload["gt_boxes_per_image"] == [2, 1, 0]
    again = invoke("recall", "--dataset", dataset["ann"], "--proposals", out / "proposals.npz",
                   "--output-dir", dataset["root"] / "o2", "--json", "-")  # fmt: skip
    assert again.exit_code == 0 and json.loads(again.stdout)["recalls"] == payload["recalls"]


def test_retrieval_cli(dataset, fakes) -> None:
    out = dataset["root"] / "out"
    result = invoke("retrieval", "--dataset", dataset["ann"], "--images", dataset["images"], "--uni-checkpoint",
                    dataset["root"] / "uni.pth", "--checkpoint", dataset["root"] / "det.pth", "--classes-file",
                    dataset["classes"], "--threshold", "0.6", "--output-dir", out, "--quiet",
                    "--json", "-")  # fmt: skip
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["predicted_images"] == {"cat": [11], "dog": [11, 22]}
    assert payload["macro_f1"] == 1.0
    # At threshold 0.5 every proposal's sigmoid(0) = 0.5 is not above it; 0.49 retrieves every image.
    again = invoke("retrieval", "--dataset", dataset["ann"], "--embeddings", out / "embeddings.npz",
                   "--threshold", "0.49", "--output-dir", dataset["root"] / "o2", "--json", "-")  # fmt: skip
    assert again.exit_code == 0, again.output
    payload = json.loads(again.stdout)
    assert payload["predicted_images"] == {"cat": [11, 22, 33], "dog": [11, 22, 33]}
    assert payload["per_class"]["cat"]["precision"] == pytest.approx(0.3333)


# ---------------------------------------------------------------- runner


def truth_detections(path: Path) -> Detections:
    boxes, labels, size = truth_for(path)
    return Detections(boxes, torch.ones(len(boxes)), labels, image_size=size)


def fake_infer(log: list, fail_after: int | None = None):
    def infer(paths):
        if fail_after is not None and len(log) >= fail_after:
            raise RuntimeError("simulated crash")
        log.append([p.name for p in paths])
        return [truth_detections(p) for p in paths]

    return infer


ITEMS = [(i, Path(f"{i}.jpg")) for i in (11, 22, 33)]


def test_runner_batches_and_resumes_after_a_crash(tmp_path) -> None:
    items = ITEMS
    log: list = []
    cache = ResultCache(tmp_path / "cache", {"model": "a"})
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_over_images(fake_infer(log, fail_after=1), items, ("boxes", "labels"), batch_size=2, cache=cache,
                        flush_every=1, progress=False)  # fmt: skip
    assert log == [["11.jpg", "22.jpg"]]
    log.clear()
    cache = ResultCache(tmp_path / "cache", {"model": "a"})
    records = run_over_images(fake_infer(log), items, ("boxes", "labels"), batch_size=2, cache=cache, progress=False)
    assert log == [["33.jpg"]]  # only the image lost in the crash runs again
    assert list(records) == [11, 22, 33]
    for image_id, path in items:
        assert torch.equal(records[image_id]["boxes"], truth_for(path)[0])
    with pytest.raises(ResumeMismatchError, match="model"):
        ResultCache(tmp_path / "cache", {"model": "b"}).open()


def test_runner_rejects_failed_images_and_wrong_counts() -> None:
    def failed(paths):
        return [Detections.failed(str(p), "cannot decode") for p in paths]

    with pytest.raises(WeDetectError, match=r"image 11 \(11.jpg\): cannot decode"):
        run_over_images(failed, ITEMS[:1], ("boxes",), progress=False)
    with pytest.raises(WeDetectError, match="returned 0 results for 1 images"):
        run_over_images(lambda paths: [], ITEMS[:1], ("boxes",), progress=False)


def _distributed_worker(rank: int, world_size: int, port: int, workdir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    from wedetect.eval.runner import init_distributed

    ctx = init_distributed("cpu")
    items = [(i, Path(f"{i % 100}.jpg")) for i in (11, 22, 33, 111, 122)]  # 111, 122 reuse images 11, 22
    log: list = []

    def infer(paths):
        log.append([str(p) for p in paths])
        return [truth_detections(p) for p in paths]

    cache = ResultCache(Path(workdir) / "cache", {"model": "a"}, ctx.rank)
    records = run_over_images(infer, items, ("boxes",), batch_size=1, cache=cache, ctx=ctx, progress=False)
    Path(workdir, f"log{rank}.json").write_text(json.dumps(log))
    if records is not None:
        Path(workdir, "result.json").write_text(json.dumps({k: v["boxes"].tolist() for k, v in records.items()}))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_runner_shards_across_ranks_and_gathers_once(tmp_path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # One image already done by an earlier run: no rank processes it again.
    cache = ResultCache(tmp_path / "cache", {"model": "a"})
    cache.open()
    cache.append([{"image_id": 11, "image_size": [1, 1], "boxes": truth_for(Path("11.jpg"))[0]}])
    torch.multiprocessing.spawn(_distributed_worker, args=(2, port, str(tmp_path)), nprocs=2)
    logs = [sum(json.loads((tmp_path / f"log{r}.json").read_text()), []) for r in range(2)]
    # The 4 remaining images (ids 22, 33, 111, 122 showing 22, 33, 11, 22.jpg), every other one per rank.
    assert logs == [["22.jpg", "11.jpg"], ["33.jpg", "22.jpg"]]
    result = json.loads((tmp_path / "result.json").read_text())
    assert list(result) == ["11", "22", "33", "111", "122"]  # dataset order, on rank 0 only
    for image_id, boxes in result.items():
        truth = truth_for(Path(f"{int(image_id) % 100}.jpg"))[0].numpy()
        np.testing.assert_array_equal(np.reshape(boxes, (-1, 4)), truth)


def test_dist_context_defaults_to_single_process(monkeypatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert DistContext.from_env() == DistContext(0, 1)


# ---------------------------------------------------------------- with a real (tiny, random) detector


@pytest.mark.slow
def test_detection_cli_runs_the_real_detector(
    official_checkpoint, tiny_tokenizer, shapes_image, tmp_path, monkeypatch
) -> None:
    """The CLI drives WeDetect itself: its rows are exactly what ``predict`` returns, mapped to categories."""
    loaded = []
    real_loader = eval_cli._load_detector
    monkeypatch.setattr(eval_cli, "_load_detector", lambda *args: loaded.append(real_loader(*args)) or loaded[-1])
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.png", "b.png"):
        (images / name).write_bytes(shapes_image.read_bytes())
    ann = {
        "images": [{"id": 5, "file_name": "a.png", "height": 200, "width": 300},
                   {"id": 9, "file_name": "b.png", "height": 200, "width": 300}],
        "categories": [{"id": 2, "name": "red"}, {"id": 4, "name": "blue"}],
        "annotations": [{"id": 1, "image_id": 5, "category_id": 2, "bbox": [20, 30, 60, 50], "area": 3000,
                         "iscrowd": 0}],
    }  # fmt: skip
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    (tmp_path / "classes.txt").write_text("red\nblue\n")
    checkpoint = official_checkpoint("keys_detector_tiny.json")
    out = tmp_path / "out"
    result = invoke("detection", "--dataset", tmp_path / "ann.json", "--images", images, "--classes-file",
                    tmp_path / "classes.txt", "--checkpoint", checkpoint, "--tokenizer", tiny_tokenizer,
                    "--device", "cpu", "--batch-size", "2", "--output-dir", out, "--quiet")  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "detections.bbox.json").read_text())
    (model,) = loaded  # the CLI's own model, already prompted with the class file (no blank prompt)
    assert model.class_names == ["red", "blue"]
    expected = []
    predicted = model.predict([images / "a.png", images / "b.png"], threshold=0.001, max_detections=300)
    for image_id, det in zip((5, 9), predicted):
        expected += det.to_coco(image_id, [2, 4])
    assert 0 < len(rows) <= 600 and len(rows) == len(expected)
    for got, want in zip(rows, expected):
        assert (got["image_id"], got["category_id"]) == (want["image_id"], want["category_id"])
        np.testing.assert_allclose(got["bbox"] + [got["score"]], want["bbox"] + [want["score"]], rtol=0, atol=1e-4)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["reported"]) == {"mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l"}
    assert all(-1 <= v <= 1 for v in metrics["stats"].values())


@pytest.mark.slow
def test_retrieval_cli_runs_the_real_models(official_checkpoint, tiny_tokenizer, shapes_image, tmp_path, monkeypatch):
    """WeDetect-Uni proposals and the detector's text tower feed the metric through the CLI unchanged."""
    from wedetect.eval.retrieval import load_embeddings

    loaded = []
    real_uni, real_detector = eval_cli._load_uni, eval_cli._load_detector
    monkeypatch.setattr(eval_cli, "_load_uni", lambda *args: loaded.append(real_uni(*args)) or loaded[-1])
    monkeypatch.setattr(eval_cli, "_load_detector", lambda *args: loaded.append(real_detector(*args)) or loaded[-1])
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(shapes_image.read_bytes())
    ann = {
        "images": [{"id": 1, "file_name": "a.png", "height": 200, "width": 300}],
        "categories": [{"id": 1, "name": "square"}, {"id": 2, "name": "circle"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [20, 30, 60, 50], "area": 3000,
                         "iscrowd": 0}],
    }  # fmt: skip
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    (tmp_path / "classes.txt").write_text("square\ncircle\n")
    out = tmp_path / "out"
    result = invoke("retrieval", "--dataset", tmp_path / "ann.json", "--images", images,
                    "--uni-checkpoint", official_checkpoint("keys_uni_base.json"),
                    "--checkpoint", official_checkpoint("keys_detector_tiny.json"), "--tokenizer", tiny_tokenizer,
                    "--classes-file", tmp_path / "classes.txt", "--device", "cpu", "--output-dir", out,
                    "--quiet", "--json", "-")  # fmt: skip
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert set(payload["per_class"]) == {"square"}  # the only category with a relevant image
    uni, detector = loaded
    (direct,) = uni.propose([images / "a.png"], num_proposals=300, score_threshold=0.0)
    saved, text = load_embeddings(out / "embeddings.npz")
    assert 0 < len(direct) <= 300 and len(saved[0].embedding) == len(direct)
    torch.testing.assert_close(saved[0].embedding, direct.embeddings)
    torch.testing.assert_close(saved[0].scale, direct.logit_scale)
    torch.testing.assert_close(saved[0].bias, direct.logit_bias)
    torch.testing.assert_close(text, detector.encode_text(["square", "circle"]).cpu())
