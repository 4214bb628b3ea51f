"""The family registry: `model_type` -> the `Family` that knows everything particular to it.

One module per family (bert.py, gpt2.py, roberta.py, distilbert.py); adding a family is one more module and
one more line in FAMILIES. docs/architecture.md walks through it with RoBERTa.
"""

from ..config import ConfigError
from . import bert, distilbert, gpt2, roberta
from .family import Family, HFFields

FAMILIES: dict[str, Family] = {f.model_type: f for f in (bert.FAMILY, gpt2.FAMILY, roberta.FAMILY, distilbert.FAMILY)}


def get_family(model_type) -> Family:
    """The family of `model_type`, or a ConfigError listing the supported ones."""
    if model_type not in FAMILIES:
        raise ConfigError(f"unknown model_type {model_type!r}: scratchformer supports {', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def presets() -> dict[str, tuple[Family, dict]]:
    """Every family's named model shapes for pretraining from scratch: name -> (family, ModelConfig sizes)."""
    return {name: (family, shape) for family in FAMILIES.values() for name, shape in family.presets.items()}


__all__ = ["FAMILIES", "Family", "HFFields", "get_family", "presets"]
