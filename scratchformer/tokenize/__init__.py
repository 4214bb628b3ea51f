"""scratchformer.tokenize: tokenizers, corpus preparation and batching (ground floor: no engine imports).

- `Tokenizer` (tokenizer.py): transformers-style tokenizer over the `tokenizers` library.
- `train_tokenizer` (train_tokenizer.py): byte-level BPE or WordPiece trained on your text.
- readers.py: documents and labelled examples out of .txt / .jsonl / .csv.
- corpus.py: `prepare_corpus` writes binary token files; `TokenFile` memory-maps them back.
- collators.py: batches for masked LM, sequence / token classification, SFT.
- loaders.py: `TokenBlockLoader` (causal-LM blocks) and `ExampleLoader`, deterministic and resumable.
"""

from scratchformer.tokenize.collators import (
    IGNORE_INDEX,
    MLMCollator,
    SequenceClassificationCollator,
    SFTCollator,
    TokenClassificationCollator,
)
from scratchformer.tokenize.corpus import CorpusInfo, TokenFile, prepare_corpus
from scratchformer.tokenize.loaders import ExampleLoader, TokenBlockLoader
from scratchformer.tokenize.readers import (
    iter_documents,
    read_classification,
    read_sft,
    read_token_classification,
)
from scratchformer.tokenize.tokenizer import BatchEncoding, Tokenizer
from scratchformer.tokenize.train_tokenizer import train_tokenizer

__all__ = [
    "BatchEncoding",
    "CorpusInfo",
    "ExampleLoader",
    "IGNORE_INDEX",
    "MLMCollator",
    "SFTCollator",
    "SequenceClassificationCollator",
    "TokenBlockLoader",
    "TokenClassificationCollator",
    "TokenFile",
    "Tokenizer",
    "iter_documents",
    "prepare_corpus",
    "read_classification",
    "read_sft",
    "read_token_classification",
    "train_tokenizer",
]
