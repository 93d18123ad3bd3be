"""XLM-RoBERTa text tower: ``<s>`` hidden state -> linear head -> L2 normalisation."""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextConfig
from ..errors import WeDetectError

TOKENIZER_HELP = (
    "The XLM-R tokenizer is needed to embed text. Pass --tokenizer PATH (a tokenizer.json file, a folder "
    "holding tokenizer.json, or a sentencepiece.bpe.model with `pip install wedetect[sentencepiece]`). "
    "Get it from https://huggingface.co/FacebookAI/xlm-roberta-base (tokenizer.json; tiny/base and "
    "large share it), or pass the hub name 'FacebookAI/xlm-roberta-base' when online; $WEDETECT_TOKENIZER "
    "gives a default."
)


class TextTower(nn.Module):
    """Embeds token ids into unit-length 768-d prompt embeddings."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        from transformers import XLMRobertaConfig, XLMRobertaModel

        hf_config = XLMRobertaConfig(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads,
            intermediate_size=config.intermediate_size,
            max_position_embeddings=config.max_position_embeddings,
            type_vocab_size=config.type_vocab_size,
            pad_token_id=config.pad_token_id,
            bos_token_id=config.bos_token_id,
            eos_token_id=config.eos_token_id,
            layer_norm_eps=config.layer_norm_eps,
            hidden_dropout_prob=0.1,
            attention_probs_dropout_prob=0.1,
        )
        # SDPA reproduces the official features bit for bit; eager attention differs by ~2e-7.
        hf_config._attn_implementation = "sdpa"
        # The pooler is unused but kept, so checkpoints round-trip in the official layout.
        self.encoder = XLMRobertaModel(hf_config, add_pooling_layer=True)
        self.proj = nn.Linear(config.hidden_size, config.embed_dim)
        self.max_tokens = config.max_position_embeddings - config.pad_token_id - 1

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[-1] > self.max_tokens:
            raise WeDetectError(
                f"a prompt is {input_ids.shape[-1]} tokens long; the text tower accepts at most {self.max_tokens}"
            )
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return F.normalize(self.proj(hidden[:, 0]), dim=-1, p=2)


def load_tokenizer(source: str | os.PathLike | None):
    """An XLM-R tokenizer from a tokenizer.json file, a folder, a sentencepiece model or a hub name."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if source is None:
        source = os.environ.get("WEDETECT_TOKENIZER")
    if source is None:
        raise WeDetectError("no tokenizer given. " + TOKENIZER_HELP)
    path = Path(source).expanduser()
    special = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                   cls_token="<s>", sep_token="</s>", mask_token="<mask>")
    try:
        if path.is_file() and path.suffix == ".json":
            return PreTrainedTokenizerFast(tokenizer_file=str(path), **special)
        if path.is_file() and path.suffix == ".model":
            from transformers import XLMRobertaTokenizer

            return XLMRobertaTokenizer(vocab_file=str(path))
        if path.is_dir():
            if (path / "tokenizer.json").is_file():
                return PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), **special)
            return AutoTokenizer.from_pretrained(str(path))
        if path.exists():
            raise WeDetectError(f"tokenizer {source} is not a tokenizer.json, a .model file or a folder")
        if path.suffix in (".json", ".model") or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", str(source)):
            raise WeDetectError(f"tokenizer {source} not found. " + TOKENIZER_HELP)
        return AutoTokenizer.from_pretrained(str(source))  # hub name (needs network or HF cache)
    except WeDetectError:
        raise
    except ImportError as e:
        raise WeDetectError(f"cannot load tokenizer {source}: {e}. " + TOKENIZER_HELP) from e
    except Exception as e:  # noqa: BLE001 - hub/offline/format errors all mean the same to the user
        raise WeDetectError(f"cannot load tokenizer {source!r} ({type(e).__name__}: {e}). " + TOKENIZER_HELP) from e
