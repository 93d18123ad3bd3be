"""WeDetect: open-vocabulary object detection as retrieval, in pure PyTorch.

Names are imported on first use, so ``import wedetect`` (and the CLI's ``--help``) stays fast.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import WeDetectError

__version__ = "0.1.0"

_EXPORTS = {
    "WeDetect": "inference",
    "WeDetectUni": "inference",
    "WeDetectRef": "ref",
    "Detections": "structures",
    "LetterboxMeta": "structures",
    "ModelConfig": "config",
    "MODEL_SIZES": "config",
    "get_config": "config",
    "load_official": "checkpoint",
    "save_official": "checkpoint",
    "CheckpointError": "checkpoint",
}

__all__ = ["WeDetectError", *_EXPORTS]

if TYPE_CHECKING:
    from .checkpoint import CheckpointError, load_official, save_official
    from .config import MODEL_SIZES, ModelConfig, get_config
    from .inference import WeDetect, WeDetectUni
    from .ref import WeDetectRef
    from .structures import Detections, LetterboxMeta


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'wedetect' has no attribute {name!r}")
