"""How our custom ops behave under `torch.autocast`: like their PyTorch counterparts, decided once per op.

PyTorch sorts its own ops into two groups for autocast: matmul-like ops (`F.linear`, `matmul`,
`scaled_dot_product_attention`) run in the autocast dtype (bf16 or fp16), and numerically sensitive ops
(`F.layer_norm`, `F.cross_entropy`, `softmax`) run in fp32. Every kernel of `scratchformer.kernels` is a
`torch.library.custom_op`, and `register_autocast_rule` files it into one of the two groups:

    register_autocast_rule(lora_linear_op, "lower_precision")   # cast floating inputs to the autocast dtype
    register_autocast_rule(layer_norm_op, "fp32")               # cast floating inputs to float32

The rule lives in the dispatcher (the `AutocastCUDA` / `AutocastCPU` keys), not at call sites: inside an
autocast region the op sees its inputs already cast, and runs with autocast switched off, exactly as a
built-in op does. `torch.library.register_autocast` does the same with one fixed dtype; ours reads the dtype
of the enclosing region at call time, so one registration serves bf16 and fp16 regions alike.
"""

from __future__ import annotations

import collections.abc

import torch
from torch._library.custom_ops import CustomOpDef

POLICIES = ("lower_precision", "fp32")
_DEVICE_TYPES = ("cuda", "cpu")


def _cast(value, device_type: str, dtype: torch.dtype):
    """`value` with every floating tensor on `device_type` cast to `dtype` (float64 is left alone, as torch
    does); tuples and lists are walked, everything else is returned unchanged."""
    if isinstance(value, torch.Tensor):
        eligible = value.is_floating_point() and value.device.type == device_type and value.dtype != torch.float64
        return value.to(dtype) if eligible else value
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, device_type, dtype) for v in value)
    if isinstance(value, collections.abc.Mapping):
        raise TypeError("custom ops take no keyword arguments under autocast")
    return value


def register_autocast_rule(op: CustomOpDef, policy: str) -> None:
    """File the custom op `op` under one of autocast's two groups, for CUDA and CPU autocast regions.

    policy: "lower_precision" (inputs cast to the region's dtype, `torch.get_autocast_dtype`) or "fp32".
    Outside an autocast region the rule does nothing: the op runs on its inputs as given.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown autocast policy {policy!r}: expected one of {POLICIES}")
    if not isinstance(op, CustomOpDef):
        raise TypeError(f"register_autocast_rule takes a torch.library.custom_op, got {type(op).__name__}")
    for device_type in _DEVICE_TYPES:
        key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        key = getattr(torch._C.DispatchKey, key_name)

        def kernel(_keyset, *args, _device_type=device_type, _key=key, **kwargs):
            if kwargs:
                raise TypeError(f"{op._qualname}: pass arguments by position under autocast, got {list(kwargs)}")
            dtype = torch.float32 if policy == "fp32" else torch.get_autocast_dtype(_device_type)
            with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(_key)):
                return op._opoverload(*_cast(args, _device_type, dtype))

        op._lib.impl(op._name, kernel, key_name, with_keyset=True)
