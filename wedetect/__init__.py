"""WeDetect: open-vocabulary object detection as retrieval, in pure PyTorch."""
from .checkpoint import CheckpointError, load_official, save_official
from .config import MODEL_SIZES, ModelConfig, get_config
from .errors import WeDetectError
from .inference import WeDetect, WeDetectUni
from .structures import Detections, LetterboxMeta

__version__ = "0.1.0"

__all__ = [
    "WeDetect",
    "WeDetectUni",
    "Detections",
    "LetterboxMeta",
    "ModelConfig",
    "MODEL_SIZES",
    "get_config",
    "load_official",
    "save_official",
    "CheckpointError",
    "WeDetectError",
]
