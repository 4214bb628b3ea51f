"""scratchformer.engine: the models (BERT and GPT-2 families), built from parameters and tensor maths."""

from .checkpoint import CheckpointError
from .config import ConfigError, ModelConfig
from .encoder import ModelOutput
from .models import CausalLM, Encoder, MaskedLM, PreTrainedModel, SequenceClassifier, TokenClassifier

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
