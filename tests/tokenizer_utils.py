"""A small XLM-R-style tokenizer built offline with the `tokenizers` library.

Same special tokens and ids as XLM-R (``<s>``=0, ``<pad>``=1, ``</s>``=2, ``<unk>``=3), a
``<s> ... </s>`` post-processor, and one token per character (CJK, ASCII letters, digits, space),
so Chinese and English class names both tokenise. Ids stay far below XLM-R's 250002 rows.
"""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, processors


def make_tiny_tokenizer(path: Path) -> Path:
    chars = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]  # common CJK block start
    chars += [chr(c) for c in range(0x21, 0x7F)] + ["▁"]
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for ch in "鞋床狗猫红色圆形汽车人桌椅灯" + "".join(chars):
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    path = Path(path)
    tok.save(str(path))
    return path
