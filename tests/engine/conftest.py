"""The engine tests use the tiny random checkpoints of tests/tiny_checkpoints.py (fixture in tests/conftest.py)."""

from tests.tiny_checkpoints import max_rel_err, padded_batch  # noqa: F401  (re-exported for `from .conftest import`)
