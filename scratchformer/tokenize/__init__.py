"""scratchformer.tokenize: tokenizers, corpus preparation and batching (ground floor: no engine imports)."""

from scratchformer.tokenize.tokenizer import BatchEncoding, Tokenizer

__all__ = ["BatchEncoding", "Tokenizer"]
