"""Sentence embeddings, sentence-transformers style: tokenizer -> encoder -> pooling -> (L2 normalise).

The pooling is the one the model folder's `1_Pooling/config.json` names (mean over real tokens by default),
and the maximum length is `sentence_bert_config.json`'s `max_seq_length`, exactly as sentence-transformers
reads them, so our vectors equal theirs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from scratchformer.tokenize import Tokenizer

from .models import Encoder

POOLING_MODES = ("mean", "cls", "max", "mean_sqrt_len")


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """hidden `[batch, seq, dim]`, attention_mask `[batch, seq]` -> `[batch, dim]`, ignoring padding."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).max(dim=1).values
    counts = mask.sum(dim=1).clamp(min=1e-9)
    summed = (hidden * mask).sum(dim=1)
    return summed / counts if mode == "mean" else summed / counts.sqrt()


def _read_pooling_mode(folder: Path) -> str:
    config = folder / "1_Pooling" / "config.json"
    if not config.is_file():
        return "mean"
    d = json.loads(config.read_text(encoding="utf-8"))
    for key, mode in (("pooling_mode_cls_token", "cls"), ("pooling_mode_max_tokens", "max"),
                      ("pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len"), ("pooling_mode_mean_tokens", "mean")):
        if d.get(key):
            return mode
    return "mean"


class SentenceEncoder:
    """`SentenceEncoder.from_pretrained(path).encode(texts)` -> `[n, hidden]` float32 tensor on the CPU."""

    def __init__(self, encoder: Encoder, tokenizer: Tokenizer, pooling: str = "mean", max_length: int | None = None):
        if pooling not in POOLING_MODES:
            raise ValueError(f"unknown pooling {pooling!r}; expected one of {POOLING_MODES}")
        self.encoder, self.tokenizer, self.pooling, self.max_length = encoder, tokenizer, pooling, max_length

    @classmethod
    def from_pretrained(cls, path, *, dtype=None, device=None, backend=None, attention=None) -> SentenceEncoder:
        folder = Path(path)
        encoder = Encoder.from_pretrained(folder, dtype=dtype, device=device, backend=backend, attention=attention)
        tokenizer = Tokenizer.from_pretrained(folder)
        max_length = None
        st_config = folder / "sentence_bert_config.json"
        if st_config.is_file():
            max_length = json.loads(st_config.read_text(encoding="utf-8")).get("max_seq_length")
        return cls(encoder, tokenizer, _read_pooling_mode(folder), max_length or encoder.config.max_length)

    @torch.no_grad()
    def encode(self, texts: str | list[str], batch_size: int = 32, normalize: bool = True) -> torch.Tensor:
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        if not texts:
            return torch.empty(0, self.encoder.config.hidden_size)
        device = self.encoder.device
        out = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(
                texts[start : start + batch_size], padding=True, truncation=True, max_length=self.max_length,
                return_tensors="pt",
            )
            mask = batch["attention_mask"].to(device)
            types = batch.get("token_type_ids")  # GPT-2 style tokenizers return none
            hidden = self.encoder(
                batch["input_ids"].to(device), attention_mask=mask, token_type_ids=None if types is None else types.to(device)
            ).last_hidden_state
            vectors = pool(hidden.float(), mask, self.pooling)
            out.append(F.normalize(vectors, p=2, dim=-1) if normalize else vectors)
        result = torch.cat(out).cpu()
        return result[0] if single else result
