"""Helpers for the training tests (a module name no other test folder uses)."""
from __future__ import annotations

from pathlib import Path

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]


def write_char_tokenizer(path: Path, texts: list[str]) -> Path:
    """A tokenizer.json splitting text into characters, with XLM-R's special ids (<s>=0, <pad>=1, </s>=2)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors

    chars = sorted({c for t in texts for c in t})
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    tok.save(str(path))
    return path


def tiny_config(data: dict, output: Path, *overrides: str, **values):
    """The shipped synth_nano config shrunk for unit tests: 64 px inputs, 2 images a batch, 2 batches an epoch."""
    from wedetect.train.config import load_config

    base = {
        "data.train_ann": str(data["train"]), "data.train_images": str(data["root"] / "train"),
        "data.val_ann": str(data["val"]), "data.val_images": str(data["root"] / "val"),
        "data.classes_file": str(data["classes"]), "data.image_size": 64, "data.num_workers": 0,
        "tokenizer": str(data["tokenizer"]), "output": str(output), "epochs": 2, "batch_size": 2,
        "max_iters_per_epoch": 2, "seed": 7, "device": "cpu", "log_interval": 1000,
        "optim.warmup_iters": 2,
    }
    base.update(values)
    return load_config("synth_nano", list(overrides), **base)
