"""scratchformer.engine: the models, built from parameters and tensor maths.

Reading order: transformer.py (the whole forward pass), heads.py, models.py (loading and saving), then
families/ (what is particular to BERT, GPT-2, RoBERTa, DistilBERT) and fused.py (the kernels swapped in).
"""

from .checkpoint import CheckpointError
from .config import ConfigError, ModelConfig
from .models import CausalLM, Encoder, MaskedLM, ModelOutput, PreTrainedModel, SequenceClassifier, TokenClassifier

__all__ = [
    "CausalLM",
    "CheckpointError",
    "ConfigError",
    "Encoder",
    "MaskedLM",
    "ModelConfig",
    "ModelOutput",
    "PreTrainedModel",
    "SequenceClassifier",
    "TokenClassifier",
]
