"""A small XLM-R-style tokenizer built offline with the `tokenizers` library.

Same special tokens and ids as XLM-R (``<s>``=0, ``<pad>``=1, ``</s>``=2, ``<unk>``=3), a
``<s> ... </s>`` post-processor and one token per character, so Chinese and English names both
tokenise. The default vocabulary covers ASCII and the first 3000 CJK code points; ``texts`` instead
limits it to the characters of those texts (a small vocabulary for text towers trained from scratch).
"""
from __future__ import annotations

from pathlib import Path

from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]


def make_tiny_tokenizer(path: Path, texts: list[str] | None = None) -> Path:
    if texts is None:
        chars = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)] + [chr(c) for c in range(0x20, 0x7F)]
    else:
        chars = sorted({c for t in texts for c in t})
    vocab = {tok: i for i, tok in enumerate(SPECIALS + [c for c in chars if c not in SPECIALS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    path = Path(path)
    tok.save(str(path))
    return path
