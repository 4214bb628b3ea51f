"""scratchformer: a transformer engine written from scratch on our own Triton kernels.

    from scratchformer import CausalLM, Tokenizer
    model = CausalLM.from_pretrained("path/to/gpt2")        # any HF safetensors checkpoint folder
"""

from scratchformer.engine import (
    CausalLM,
    CheckpointError,
    ConfigError,
    Encoder,
    MaskedLM,
    ModelConfig,
    ModelOutput,
    SequenceClassifier,
    TokenClassifier,
)
from scratchformer.engine.lora import (
    LoRALinear,
    apply_lora,
    count_parameters,
    load_adapter,
    merge_lora,
    print_trainable_parameters,
    save_adapter,
    unmerge_lora,
)
from scratchformer.engine.sentence import SentenceEncoder
from scratchformer.tokenize import Tokenizer

__version__ = "0.1.0"

__all__ = [
    "CausalLM",
    "CheckpointError",
    "ConfigError",
    "Encoder",
    "LoRALinear",
    "apply_lora",
    "count_parameters",
    "load_adapter",
    "merge_lora",
    "print_trainable_parameters",
    "save_adapter",
    "unmerge_lora",
    "MaskedLM",
    "ModelConfig",
    "ModelOutput",
    "SentenceEncoder",
    "SequenceClassifier",
    "TokenClassifier",
    "Tokenizer",
]
