"""`register_autocast_rule`: a custom op under autocast behaves like its PyTorch counterpart."""

import pytest
import torch

from scratchformer.kernels.autocast import register_autocast_rule


@torch.library.custom_op("scratchformer_test::scaled_matmul", mutates_args=())
def _scaled_matmul(x: torch.Tensor, w: torch.Tensor, scale: float) -> torch.Tensor:
    return (x @ w.t()) * scale


@torch.library.custom_op("scratchformer_test::row_norm", mutates_args=())
def _row_norm(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


register_autocast_rule(_scaled_matmul, "lower_precision")
register_autocast_rule(_row_norm, "fp32")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lower_precision_ops_follow_the_regions_dtype_as_f_linear_does(dtype):
    x, w = torch.randn(5, 7), torch.randn(3, 7)
    with torch.autocast("cpu", dtype=dtype):
        ours = _scaled_matmul(x, w, 0.5)
        theirs = torch.nn.functional.linear(x, w)
    assert ours.dtype == theirs.dtype == dtype
    torch.testing.assert_close(ours.float(), (x.to(dtype).float() @ w.to(dtype).float().t()) * 0.5,
                               rtol=1e-2, atol=1e-2)


def test_fp32_ops_compute_in_float32_as_cross_entropy_does():
    # (CUDA autocast runs F.layer_norm in fp32 too; CPU autocast leaves it in bf16, so cross-entropy is the
    # counterpart both devices agree on.)
    x = torch.randn(4, 9, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = _row_norm(x)
        theirs = torch.nn.functional.cross_entropy(x, torch.zeros(4, dtype=torch.long))
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, x.float() / x.float().norm(dim=-1, keepdim=True))


def test_outside_autocast_the_rule_changes_nothing():
    x, w = torch.randn(5, 7, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64)
    assert _scaled_matmul(x, w, 1.0).dtype == torch.float64
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _scaled_matmul(x, w, 1.0).dtype == torch.float64  # float64 is never cast, as in torch


def test_unknown_policy_and_plain_functions_are_refused():
    with pytest.raises(ValueError, match="unknown autocast policy 'fp8'"):
        register_autocast_rule(_row_norm, "fp8")
    with pytest.raises(TypeError, match="custom_op"):
        register_autocast_rule(lambda x: x, "fp32")
