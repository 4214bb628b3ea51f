"""scratchformer.kernels"""
from scratchformer.kernels.adamw import fused_adamw_, multi_tensor_norm, nonfinite_check_  # noqa: F401
