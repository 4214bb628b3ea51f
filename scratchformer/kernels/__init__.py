"""scratchformer.kernels"""

from .lora import lora_dropout_mask, lora_linear
from .lora_reference import lora_linear_reference
