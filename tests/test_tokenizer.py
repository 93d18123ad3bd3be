"""Tokenizer loading: the forms users pass, and clear errors when none is available."""
from __future__ import annotations

import shutil

import pytest

from wedetect import WeDetectError
from wedetect.models.text import load_tokenizer


def test_file_and_folder_give_xlmr_special_ids(tiny_tokenizer, tmp_path):
    folder = tmp_path / "xlm-roberta-base"
    folder.mkdir()
    shutil.copy(tiny_tokenizer, folder / "tokenizer.json")
    for source in (tiny_tokenizer, folder, str(folder)):
        tok = load_tokenizer(source)
        out = tok(["鞋", "床床"], return_tensors="pt", padding=True)
        ids = out["input_ids"].tolist()
        assert ids[0][0] == 0 and ids[0][2] == 2 and ids[0][3] == 1  # <s> x </s> <pad>
        assert out["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]


def test_missing_or_absent_tokenizer_explains_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.delenv("WEDETECT_TOKENIZER", raising=False)
    with pytest.raises(WeDetectError, match="no tokenizer given.*xlm-roberta-base"):
        load_tokenizer(None)
    with pytest.raises(WeDetectError, match="not found"):
        load_tokenizer(tmp_path / "nope" / "tokenizer.json")
    junk = tmp_path / "junk.txt"
    junk.write_text("x")
    with pytest.raises(WeDetectError, match="not a tokenizer.json"):
        load_tokenizer(junk)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeDetectError, match="cannot load tokenizer 'someorg/no-such-tokenizer'"):
        load_tokenizer("someorg/no-such-tokenizer")


def test_env_var_default(tiny_tokenizer, monkeypatch):
    monkeypatch.setenv("WEDETECT_TOKENIZER", str(tiny_tokenizer))
    assert load_tokenizer(None)(["鞋"])["input_ids"][0][0] == 0
