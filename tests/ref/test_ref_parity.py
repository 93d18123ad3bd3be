"""WeDetect-Ref against the official model's recorded outputs (tiny Qwen3-VL, deterministic weights).

Every folder under ``parity_dir()`` holding ``config.json`` and ``case_*.json`` is a Ref fixture
folder; every case in it runs. Stages are compared in pipeline order so that a failure names the
first stage that diverges (see the fixture README for what each array is).
"""
from __future__ import annotations

import hashlib
import json
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch

from paths import FIXTURES, parity_dir

sys.path.insert(0, str(FIXTURES))
import detweights  # noqa: E402

from wedetect.models.ref import box_position_sine, image_position_sine, rois_to_resized  # noqa: E402
from wedetect.ref import WeDetectRef  # noqa: E402


def ref_fixture_dirs() -> list[Path]:
    root = parity_dir()
    return sorted(p.parent for p in root.rglob("config.json") if any(p.parent.glob("case_*.json")))


CASES = [(folder, case) for folder in ref_fixture_dirs() for case in sorted(folder.glob("case_*.json"))]
IDS = [f"{folder.name}/{case.stem[len('case_'):]}" for folder, case in CASES]


@lru_cache(maxsize=None)
def _load(checkpoint: Path) -> WeDetectRef:
    return WeDetectRef.from_pretrained(checkpoint, device="cpu", dtype="float32")


def _close(stage: str, actual, expected, atol: float = 1e-4, rtol: float = 0.0) -> None:
    actual = actual.detach().float().cpu().numpy() if isinstance(actual, torch.Tensor) else np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, f"{stage}: shape {actual.shape} != {expected.shape}"
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=f"stage {stage}")


def _exact(stage: str, actual, expected) -> None:
    actual = actual.cpu().numpy() if isinstance(actual, torch.Tensor) else np.asarray(actual)
    np.testing.assert_array_equal(actual, np.asarray(expected), err_msg=f"stage {stage}")


def _case(case: Path):
    meta = json.loads(case.read_text())
    arrays = np.load(case.with_suffix(".npz"))
    image = case.parent.parent / meta["image"]  # images live in the fixture folder's parent
    return meta, arrays, image


@pytest.mark.parity
@pytest.mark.slow
@pytest.mark.parametrize("folder,case", CASES, ids=IDS)
def test_ref_stages(folder: Path, case: Path, ref_checkpoint) -> None:
    ref = _load(ref_checkpoint(folder))
    model = ref.model
    meta, z, image = _case(case)
    boxes = z["boxes"]

    # Loading: exactly the official key set, with the values written to the checkpoint.
    state = model.state_dict()
    [keys_file] = folder.glob("keys_*.json")
    assert set(state) == set(json.loads(keys_file.read_text())), "model keys differ from the official checkpoint's"
    for key in ("out_proj.weight", "model.merge.weight", "model.first_scale_norm.bias"):
        _exact(f"weight {key}", state[key], detweights.value(key, state[key].shape))

    # Inputs: resize, prompt, tokens, pixels.
    prepared = ref.prepare(image)
    assert [prepared.resized.height, prepared.resized.width] == meta["resized_size_hw"]
    assert hashlib.md5(np.asarray(prepared.resized).tobytes()).hexdigest() == meta["resized_rgb_md5"]
    prompt = ref.prompt(meta["query"], len(boxes))
    assert prompt == meta["prompt_text"]
    n_image = meta["num_image_tokens"]
    input_ids, mask = ref.tokenize([prompt], n_image, len(boxes))
    _exact("input_ids", input_ids, z["input_ids"])
    _exact("attention_mask", mask, z["attention_mask"])
    _exact("image_grid_thw", prepared.image_grid_thw, z["image_grid_thw"])
    pixels = prepared.pixel_values
    _exact("pixel_values_shape", pixels.shape, z["pixel_values_shape"])
    _close("pixel_values_val", pixels.flatten()[z["pixel_values_idx"]], z["pixel_values_val"], atol=1e-5)
    _close("pixel_values_row_sum", pixels.double().sum(1), z["pixel_values_row_sum"], atol=0, rtol=1e-6)
    grid = prepared.image_grid_thw
    position_ids = model.model.position_ids(input_ids, mask, grid)
    _exact("position_ids", position_ids[:, 0], z["position_ids"])
    _exact("object_positions", torch.nonzero(input_ids[0] == model.object_token_id).flatten(), z["object_positions"])

    with torch.inference_mode():
        feats = ref.encode(prepared, boxes).features
        _close("vision_embeds", feats.embeds, z["vision_embeds"])
        for k, level in enumerate(feats.deepstack):
            _close(f"deepstack_{k}", level, z[f"deepstack_{k}"])
        _close("feat_stride8", feats.maps[0][0], z["feat_stride8"])
        _close("feat_stride16", feats.maps[1][0], z["feat_stride16"])
        h_m, w_m = meta["merged_grid_hw"]
        hidden = model.config.text_config.hidden_size
        _close("image_pos_sine", image_position_sine(h_m, w_m, hidden), z["image_pos_sine"])
        _close("image_pos_embed", feats.pos_embeds, z["image_pos_embed"])

        rois = rois_to_resized(torch.from_numpy(boxes), tuple(meta["original_size_wh"]), feats.resized_hw)
        _close("rois_resized", rois, z["rois_resized"], atol=1e-3)
        levels = model.model.roi_align_levels(feats.maps, rois)
        for name, level in zip(("roi_stride8", "roi_stride16", "roi_stride32"), levels):
            _close(name, level, z[name])
        merged = model.model.merge_rois(levels)
        _close("roi_merged", merged, z["roi_merged"])
        _close("object_vision_embed", model.model.project_rois(merged), z["object_vision_embed"])
        box_sine = box_position_sine(rois, feats.resized_hw, hidden)
        _close("box_pos_sine", box_sine, z["box_pos_sine"])
        _close("box_pos_embed", model.model.object_pos_projector(box_sine), z["box_pos_embed"])
        _close("object_embeds", model.model.embed_objects(feats, rois), z["object_embeds"])
        inputs_embeds, image_mask = model.model.build_inputs_embeds(input_ids, [feats], [rois], model.object_token_id)
        _close("inputs_embeds", inputs_embeds[0], z["inputs_embeds"])
        _exact("visual_pos_mask", image_mask[0], z["visual_pos_mask"])

        out = model(input_ids, [torch.from_numpy(boxes)], [tuple(meta["original_size_wh"])], vision_features=[feats])
        _close("last_hidden_state", out.last_hidden_state[0], z["last_hidden_state"])
        _close("object_hidden", out.last_hidden_state[0, z["object_positions"]], z["object_hidden"])
        _close("logits_all", out.logits[0], z["logits_all"])
        _close("proposal_logits", out.proposal_logits[0], z["proposal_logits"], atol=1e-5, rtol=1e-4)


def _indices(selected: torch.Tensor, boxes: np.ndarray) -> list[int]:
    """Position of each returned box among the inputs (returned boxes are bit-exact input rows)."""
    return [int(np.flatnonzero((boxes == b).all(1))[0]) for b in selected.numpy()]


@pytest.mark.parity
@pytest.mark.slow
@pytest.mark.parametrize("folder,case", CASES, ids=IDS)
def test_ref_end_to_end(folder: Path, case: Path, ref_checkpoint) -> None:
    """Public API only: scores, top-1 and threshold selections, full-precision boxes."""
    ref = _load(ref_checkpoint(folder))
    meta, z, image = _case(case)
    boxes = z["boxes"]
    prepared = ref.encode(image, boxes)  # one vision pass for all the calls below

    scores = ref.score(prepared, meta["query"])
    _close("scores", scores, z["scores"], atol=1e-5, rtol=1e-4)

    [top1] = ref.predict([prepared], meta["query"])
    _exact("top1_index", _indices(top1.boxes, boxes), z["top1_index"])
    _exact("top1_box", top1.boxes, z["top1_box"])  # input boxes returned as given, no bf16 rounding
    _close("top1_score", top1.scores, z["top1_score"], atol=1e-5, rtol=1e-4)
    assert top1.names == [meta["query"]] and top1.image_size == tuple(meta["original_size_wh"][::-1])

    for tag, threshold in (("thr05", 0.5), ("thrsplit", meta["results"]["threshold_split"]["threshold"])):
        [[det]] = ref.predict(prepared, [meta["query"]], threshold=threshold)
        _exact(f"{tag}_index", _indices(det.boxes, boxes), z[f"{tag}_index"])
        _exact(f"{tag}_boxes", det.boxes.reshape(-1, 4), z[f"{tag}_boxes"].reshape(-1, 4))
        _close(f"{tag}_scores", det.scores, z[f"{tag}_scores"], atol=1e-5, rtol=1e-4)
