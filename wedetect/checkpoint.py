"""Official checkpoint <-> our modules: the one place that knows key names and file formats.

Official detector files (``wedetect_{tiny,base,large}.pth``) are mmengine checkpoints: a dict with
``state_dict`` (and maybe ``meta``). Official WeDetect-Uni files are flat dicts of tensors with the
detector's vision keys plus ``embeddings``. ``.safetensors`` files hold the same flat keys.
Loading is strict: the only keys dropped silently are the official ones known to be unused
(ConvNeXt ``norm``/``head`` classifier); they are kept aside and written back on save so our files
load in the official code too.
"""
from __future__ import annotations

import contextlib
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import MODEL_SIZES, ModelConfig, get_config
from .errors import WeDetectError

# (official prefix, our prefix); longest official prefixes first.
_PREFIXES = (
    ("backbone.image_model.model.", "image_tower."),
    ("backbone.text_model.model.", "text_tower.encoder."),
    ("backbone.text_model.head.", "text_tower.proj."),
    ("bbox_head.head_module.", "head."),
    ("neck.", "neck."),
    ("embeddings", "prompts"),
)
# Official keys that no computation uses: the ImageNet classifier of ConvNeXt.
_UNUSED = re.compile(r"^backbone\.image_model\.model\.(norm|head)\.")
_STEM_KEY = "backbone.image_model.model.downsample_layers.0.0.weight"

class CheckpointError(WeDetectError):
    """A checkpoint file is missing, unreadable, of the wrong kind, or does not match the model."""


@dataclass
class OfficialCheckpoint:
    """A checkpoint read from disk: official-layout keys, its kind and size."""

    state_dict: dict[str, torch.Tensor]
    kind: str  # "detector", "uni" or "closed_set"
    size: str
    path: str
    meta: dict


def to_ours(key: str) -> str:
    for official, ours in _PREFIXES:
        if key.startswith(official):
            return ours + key[len(official):]
    return key


def to_official(key: str) -> str:
    for official, ours in _PREFIXES:
        if key.startswith(ours):
            return official + key[len(ours):]
    return key


def resolve_path(spec: str | os.PathLike) -> Path:
    """A local path, or ``hf://ORG/REPO/FILE`` / ``ORG/REPO/FILE`` downloaded from the Hugging Face hub."""
    text = str(spec)
    path = Path(text).expanduser()
    if path.exists():
        return path
    match = re.fullmatch(r"(?:hf://)?([\w.-]+/[\w.-]+)/([\w./-]+\.(?:pth|pt|bin|safetensors))", text)
    if match is None:
        raise CheckpointError(f"checkpoint {text} not found")
    repo, filename = match.groups()
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id=repo, filename=filename))
    except Exception as e:  # noqa: BLE001 - offline, missing file, auth: one message for the user
        raise CheckpointError(
            f"checkpoint {text} is not a local file and could not be downloaded ({type(e).__name__}). "
            f"Download {filename} from https://huggingface.co/{repo} and pass its local path."
        ) from e


@dataclass
class RawCheckpoint:
    """What a checkpoint file holds: tensors under official names, the mmengine ``meta`` (if any)
    and whether the tensors were wrapped in an mmengine dict (``state_dict``) or stored flat."""

    state_dict: dict[str, torch.Tensor]
    meta: dict
    wrapped: bool


def read_checkpoint(path: str | os.PathLike) -> RawCheckpoint:
    """Read a .pth (mmengine dict or flat) or .safetensors file."""
    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file():
        raise CheckpointError(f"{path} is a Hugging Face model folder (a WeDetect-Ref checkpoint?): "
                              "pass it to `wedetect ref --ref-checkpoint`")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return RawCheckpoint({k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {}), False)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as safe_error:  # noqa: BLE001 - mmengine `meta` may hold non-tensor objects
        if os.environ.get("WEDETECT_SAFE_LOAD") == "1":
            raise CheckpointError(f"{path}: cannot be read with weights_only=True ({safe_error})") from safe_error
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({e})") from e
        warnings.warn(
            f"{path} holds non-tensor objects and was fully unpickled; load only files you trust "
            "(set WEDETECT_SAFE_LOAD=1 to refuse such files)",
            stacklevel=2,
        )
    wrapped = isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict)
    meta = obj.get("meta") if wrapped and isinstance(obj.get("meta"), dict) else {}
    sd = obj["state_dict"] if wrapped else obj
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors (or an mmengine dict with 'state_dict')")
    # Checkpoints saved from a DDP-wrapped model carry a 'module.' prefix.
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    return RawCheckpoint(sd, meta, wrapped)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, official key names."""
    return read_checkpoint(path).state_dict


def detect_kind(state_dict: dict[str, torch.Tensor], wrapped: bool = False, meta: dict | None = None) -> str:
    """``detector`` (text tower), ``uni`` (flat file with objectness ``embeddings``) or ``closed_set``
    (``embeddings`` as a fixed classifier, in an mmengine dict as training writes it)."""
    has_text = any(k.startswith("backbone.text_model.") for k in state_dict)
    if has_text:
        return "detector"
    if "embeddings" in state_dict:
        marked = (meta or {}).get("wedetect_kind")
        return marked if marked in ("uni", "closed_set") else ("closed_set" if wrapped else "uni")
    if _STEM_KEY in state_dict:
        raise CheckpointError("checkpoint has the image tower but neither a text tower nor class/objectness "
                              "'embeddings': it cannot score anything")
    raise CheckpointError("not a WeDetect checkpoint: no ConvNeXt stem key " + _STEM_KEY)


def detect_size(state_dict: dict[str, torch.Tensor]) -> str:
    stem = state_dict.get(_STEM_KEY)
    if stem is None:
        raise CheckpointError("cannot tell the model size: no ConvNeXt stem key " + _STEM_KEY)
    for name, cfg in MODEL_SIZES.items():
        if stem.shape[0] == cfg.dims[0]:
            return name
    raise CheckpointError(f"unknown ConvNeXt stem width {stem.shape[0]} (tiny 96, base 128, large 192)")


def load_official(spec: str | os.PathLike, expected_kind: str | tuple[str, ...]) -> OfficialCheckpoint:
    """Read a checkpoint and check that its kind (``detector``, ``uni``, ``closed_set``) is expected."""
    path = resolve_path(spec)
    raw = read_checkpoint(path)
    kind = detect_kind(raw.state_dict, raw.wrapped, raw.meta)
    expected = (expected_kind,) if isinstance(expected_kind, str) else expected_kind
    if kind not in expected:
        hints = {
            "uni": "this is a WeDetect-Uni checkpoint (objectness prompts, no text tower): pass it as --uni-checkpoint",
            "detector": "this is a WeDetect detector checkpoint: pass it as --checkpoint; "
            "WeDetect-Uni needs a *_uni checkpoint with objectness 'embeddings'",
            "closed_set": "this is a closed-set WeDetect checkpoint (fixed classes, no text tower): "
            "pass it as --checkpoint",
        }
        raise CheckpointError(f"{path}: " + hints[kind])
    return OfficialCheckpoint(raw.state_dict, kind, detect_size(raw.state_dict), str(path), raw.meta)


def _no_init():
    """Skip random weight init while building a model that a checkpoint will fill."""
    try:
        from transformers.initialization import no_init_weights

        return no_init_weights()
    except ImportError:  # older transformers: plain (slower) init
        return contextlib.nullcontext()


def load_into(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True) -> dict:
    """Load official-layout tensors into ``model``; returns the known-unused tensors set aside.

    Strict: any missing or unexpected key (other than the known-unused ones) or shape mismatch raises
    ``CheckpointError`` listing them.
    """
    ours, unused = {}, {}
    for k, v in state_dict.items():
        if _UNUSED.match(k):
            unused[k] = v
        else:
            ours[to_ours(k)] = v
    expected = model.state_dict()
    missing = sorted(to_official(k) for k in expected.keys() - ours.keys())
    unexpected = sorted(to_official(k) for k in ours.keys() - expected.keys())
    mismatched = [
        f"{to_official(k)}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in ours.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if mismatched or (strict and (missing or unexpected)):
        parts = []
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if items:
                shown = ", ".join(items[:20]) + (f", ... ({len(items)} in all)" if len(items) > 20 else "")
                parts.append(f"{title} keys: {shown}")
        raise CheckpointError("checkpoint does not match the model; " + "; ".join(parts))
    model.load_state_dict({k: v for k, v in ours.items() if k in expected}, strict=False)
    return unused


def build_from_checkpoint(ckpt: OfficialCheckpoint, size: str | None = None, strict: bool = True):
    """Build the network a checkpoint describes and fill it. ``size`` overrides shape detection."""
    from .models.detector import WeDetectClosedSetModel, WeDetectModel, WeDetectUniModel

    if size is not None and size != ckpt.size:
        raise CheckpointError(f"{ckpt.path}: a {ckpt.size} checkpoint, but size={size!r} was requested")
    config: ModelConfig = get_config(ckpt.size)
    with _no_init():
        if ckpt.kind == "uni":
            model = WeDetectUniModel(config)
        elif ckpt.kind == "closed_set":
            model = WeDetectClosedSetModel(config, num_classes=ckpt.state_dict["embeddings"].shape[0])
        else:
            model = WeDetectModel(config)
    model.unused_official_state = load_into(model, ckpt.state_dict, strict=strict)
    return model.eval()


def official_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors under official key names (plus the set-aside unused official tensors)."""
    sd = {to_official(k): v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    sd.update(getattr(model, "unused_official_state", {}))
    return sd


def save_official(model: torch.nn.Module, path: str | os.PathLike, meta: dict | None = None) -> Path:
    """Write ``model`` in the official layout: .pth (detector: mmengine dict; Uni: flat) or .safetensors."""
    from .models.detector import WeDetectUniModel

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = official_state_dict(model)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        kind = "uni" if isinstance(model, WeDetectUniModel) else "closed_set" if "embeddings" in sd else "detector"
        save_file(sd, str(path), metadata={"format": "pt", "wedetect_kind": kind})
    elif isinstance(model, WeDetectUniModel):
        torch.save(sd, path)
    else:
        torch.save({"state_dict": sd, "meta": dict(meta or {})}, path)
    return path
