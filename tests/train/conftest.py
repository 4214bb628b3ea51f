"""Fixtures of the training tests."""

import pytest


@pytest.fixture
def torch_optimizer_paths(monkeypatch):
    """For tests of the loop's logic rather than of our kernels (AdamW and clipping are checked against torch in
    test_adamw.py / test_clip.py, and step for step in the parity tests): without TRITON_INTERPRET they take
    torch's fused CPU paths, a fraction of a second per step instead of the interpreter's seconds. Both read
    the variable at every step, so unsetting it for the test is enough."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
