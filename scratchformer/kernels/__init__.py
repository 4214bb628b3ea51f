"""scratchformer.kernels: our Triton kernels and the plain-PyTorch reference of each.

Ground floor of the package: imports torch and triton only.
"""

from .adamw import fused_adamw_, multi_tensor_norm, nonfinite_check_
from .attention_reference import attention_reference
from .flash_attention import flash_attention
from .lora import lora_dropout_mask, lora_linear
from .lora_reference import lora_linear_reference
from .layer_norm import layer_norm
from .layer_norm_reference import layer_norm_reference
from .bias_gelu import bias_gelu
from .bias_gelu_reference import bias_gelu_reference
from .cross_entropy import default_chunk_size, linear_cross_entropy
from .cross_entropy_reference import linear_cross_entropy_reference
