"""Pick the model class a checkpoint folder was saved as, from its config.json, like HF's `AutoModel`.

    model = load_model("path/to/checkpoint")      # GPT2LMHeadModel -> CausalLM, BertForMaskedLM -> MaskedLM, ...
"""

from __future__ import annotations

import os

from .checkpoint import CONFIG_NAME, resolve_folder
from .config import ModelConfig
from .families import FAMILIES, get_family
from .models import CausalLM, Encoder, MaskedLM, SequenceClassifier, TokenClassifier

MODEL_CLASSES = {cls.__name__: cls for cls in (Encoder, MaskedLM, CausalLM, SequenceClassifier, TokenClassifier)}

# HF architecture name -> our class, from every family's table; the aliases are close relatives whose extra
# heads we do not have (BertForPreTraining): the body and the heads we do have still load.
ARCHITECTURES = {}
for family in FAMILIES.values():
    ARCHITECTURES.update({hf: MODEL_CLASSES[ours] for ours, hf in family.architectures.items()})
    ARCHITECTURES.update({hf: MODEL_CLASSES[ours] for hf, ours in family.architecture_aliases.items()})

# PEFT's task_type -> our class (an adapter trained for a task fixes the head, whatever the base checkpoint was).
TASK_CLASSES = {"SEQ_CLS": SequenceClassifier, "TOKEN_CLS": TokenClassifier, "CAUSAL_LM": CausalLM,
                "FEATURE_EXTRACTION": Encoder}


def auto_model_class(config: ModelConfig, task_type: str | None = None) -> type:
    """The class to load `config` as: PEFT `task_type` first (when given and known), then the first
    `architectures` entry of config.json, then the family's default (BERT: Encoder, GPT-2: CausalLM)."""
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
    return MODEL_CLASSES[get_family(config.model_type).default_model]


def read_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of a checkpoint folder (errors name the folder)."""
    return ModelConfig.from_json_file(resolve_folder(path) / CONFIG_NAME)


def load_model(path: str | os.PathLike, *, task_type: str | None = None, **kwargs):
    """`<the right class>.from_pretrained(path, **kwargs)`; see `auto_model_class`."""
    return auto_model_class(read_config(path), task_type).from_pretrained(path, **kwargs)
