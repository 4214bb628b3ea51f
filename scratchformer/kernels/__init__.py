"""scratchformer.kernels"""

from .lora import lora_dropout_mask, lora_linear
from .lora_reference import lora_linear_reference
from .layer_norm import layer_norm
from .layer_norm_reference import layer_norm_reference
from .bias_gelu import bias_gelu
from .bias_gelu_reference import bias_gelu_reference
from .cross_entropy import default_chunk_size, linear_cross_entropy
from .cross_entropy_reference import linear_cross_entropy_reference
