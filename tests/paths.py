"""Where the oracle fixtures live: the project's copies, or folders named by environment variables.

WEDETECT_PARITY_DIR   detector/Uni fixtures at its top, Ref fixture folders (e.g. ref_tiny/) below it
WEDETECT_METRICS_DIR  metric cases (one folder per case, each with a case.json)
WEDETECT_TRAIN_DIR    training-loss cases (*.json + *.npz pairs)
"""
from __future__ import annotations

import os
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def _env_dir(var: str, default: Path) -> Path:
    value = os.environ.get(var)
    return Path(value).expanduser().resolve() if value else default


def parity_dir() -> Path:
    return _env_dir("WEDETECT_PARITY_DIR", FIXTURES)


def metrics_dir() -> Path:
    return _env_dir("WEDETECT_METRICS_DIR", FIXTURES / "metrics")


def train_dir() -> Path:
    return _env_dir("WEDETECT_TRAIN_DIR", FIXTURES / "train")
