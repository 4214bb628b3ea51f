"""scratchformer.kernels"""

from scratchformer.kernels.attention_reference import attention_reference
from scratchformer.kernels.flash_attention import flash_attention
