"""Class-name lists: ``--classes 'a,b'`` strings and class files.

A class file is either the official format (a JSON list with one entry per class, each a list of
names: the name first, then synonyms; a plain string entry is accepted too) or a text file with one
class per line. Only the first name of an entry is used as the prompt, as in official evaluation.

Wherever a class file is accepted, a built-in name (``coco_zh``, ``lvis``, ...; see
:func:`builtin_class_files`) selects one of the official lists shipped in ``wedetect/data/texts``;
an existing file of that name always wins.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import WeDetectError
from .io import read_text

_TEXTS = Path(__file__).resolve().parent / "texts"
# Built-in name -> shipped file. The first four are the official data/texts files (COCO / LVIS v1,
# English / Chinese, with synonyms); the retrieval_* lists are the one-name-per-class Chinese lists
# hard-coded in the official retrieval script (LVIS differs from lvis_zh at 34 classes).
_BUILTIN = {
    "coco": "coco_class_texts.json",
    "coco_zh": "coco_zh_class_texts.json",
    "lvis": "lvis_v1_class_texts.json",
    "lvis_zh": "lvis_v1_zh_class_texts.json",
    "retrieval_coco_zh": "retrieval_coco_zh.json",
    "retrieval_lvis_zh": "retrieval_lvis_zh.json",
}


def builtin_class_files() -> dict[str, Path]:
    """Built-in class-list names and the shipped files they stand for."""
    return {name: _TEXTS / file for name, file in _BUILTIN.items()}


def resolve_class_file(spec: str | os.PathLike) -> Path:
    """The class file ``spec`` names: an existing file, else a built-in list of that name."""
    path = Path(spec)
    if path.is_file():
        return path
    builtin = builtin_class_files().get(os.fspath(spec))
    if builtin is not None:
        return builtin
    raise WeDetectError(f"class file {path} not found (built-in class lists: {', '.join(_BUILTIN)})")


def parse_classes(text: str) -> list[str]:
    """Split ``--classes`` on ASCII commas (as the official demo; a full-width '，' is part of a name),
    strip each name and reject empty ones."""
    names = [n.strip() for n in text.split(",")]
    if not text.strip() or any(not n for n in names):
        raise WeDetectError(f"--classes {text!r}: give comma-separated, non-empty class names")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise WeDetectError(f"--classes names {', '.join(repeated)} more than once")
    return names


def load_class_names(path: str | os.PathLike) -> list[list[str]]:
    """Entries of a class file or built-in list, each a non-empty list of names (first = the prompt)."""
    path = resolve_class_file(path)
    text = read_text(path, "class file")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise WeDetectError(f"class file {path}: invalid JSON ({e})") from e
        if not isinstance(data, list) or not data:
            raise WeDetectError(f"class file {path}: expected a non-empty JSON list of classes")
        entries = []
        for i, entry in enumerate(data):
            names = [entry] if isinstance(entry, str) else entry
            if not isinstance(names, list) or not names or not all(isinstance(n, str) and n.strip() for n in names):
                raise WeDetectError(f"class file {path}: entry {i} must be a name or a non-empty list of names")
            entries.append([n.strip() for n in names])
        return entries
    lines = [ln.strip() for ln in text.splitlines()]
    entries = [[ln] for ln in lines if ln]
    if not entries:
        raise WeDetectError(f"class file {path} is empty")
    return entries


def class_prompts(classes: str | None = None, classes_file: str | os.PathLike | None = None) -> list[str]:
    """The prompt list from exactly one of ``--classes`` / ``--classes-file``."""
    if (classes is None) == (classes_file is None):
        raise WeDetectError("give exactly one of --classes or --classes-file")
    if classes is not None:
        return parse_classes(classes)
    return [entry[0] for entry in load_class_names(classes_file)]
