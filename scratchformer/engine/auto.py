"""Pick the model class a checkpoint folder was saved as, from its config.json, like HF's `AutoModel`.

    model = load_model("path/to/checkpoint")      # GPT2LMHeadModel -> CausalLM, BertForMaskedLM -> MaskedLM, ...
"""

from __future__ import annotations

import os

from .checkpoint import CONFIG_NAME, resolve_folder
from .config import ModelConfig
from .models import CausalLM, Encoder, MaskedLM, SequenceClassifier, TokenClassifier

MODEL_CLASSES = (Encoder, MaskedLM, CausalLM, SequenceClassifier, TokenClassifier)

# HF architecture name -> our class, from each class's own `architectures` table.
ARCHITECTURES = {hf: cls for cls in MODEL_CLASSES for hf in cls.architectures.values()}
# Close relatives whose extra heads we do not have: the body and the heads we do have still load.
ARCHITECTURES.update(BertForPreTraining=MaskedLM, BertLMHeadModel=MaskedLM)

# PEFT's task_type -> our class (an adapter trained for a task fixes the head, whatever the base checkpoint was).
TASK_CLASSES = {"SEQ_CLS": SequenceClassifier, "TOKEN_CLS": TokenClassifier, "CAUSAL_LM": CausalLM,
                "FEATURE_EXTRACTION": Encoder}

# With no `architectures` in config.json: the family's natural model.
DEFAULT_CLASS = {"bert": Encoder, "gpt2": CausalLM}


def auto_model_class(config: ModelConfig, task_type: str | None = None) -> type:
    """The class to load `config` as: PEFT `task_type` first (when given and known), then the first
    `architectures` entry of config.json, then the family default (BERT: Encoder, GPT-2: CausalLM)."""
    if task_type in TASK_CLASSES:
        return TASK_CLASSES[task_type]
    architectures = config.extra.get("architectures") or []
    for name in architectures:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    if architectures:
        raise ValueError(
            f"architectures {architectures} name no model scratchformer has; supported: {sorted(ARCHITECTURES)}"
        )
    return DEFAULT_CLASS[config.model_type]


def read_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of a checkpoint folder (errors name the folder)."""
    return ModelConfig.from_json_file(resolve_folder(path) / CONFIG_NAME)


def load_model(path: str | os.PathLike, *, task_type: str | None = None, **kwargs):
    """`<the right class>.from_pretrained(path, **kwargs)`; see `auto_model_class`."""
    return auto_model_class(read_config(path), task_type).from_pretrained(path, **kwargs)
