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

if TYPE_CHECKING:  # for type checkers and IDEs; at run time names load lazily below
    from .checkpoint import CheckpointError, load_official, save_official  # noqa: F401
    from .config import MODEL_SIZES, ModelConfig, get_config  # noqa: F401
    from .inference import WeDetect, WeDetectUni  # noqa: F401
    from .ref import WeDetectRef  # noqa: F401
    from .structures import Detections, LetterboxMeta  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'wedetect' has no attribute {name!r}")
