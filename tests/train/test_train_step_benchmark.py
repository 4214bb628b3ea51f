"""benchmarks/train_step.py's plan: which shapes a run measures and where it writes them (nothing is run here;
the benchmark itself is run by hand, its quick mode in about a minute on a CPU)."""

import importlib.util
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    saved = os.environ.get("TRITON_INTERPRET")
    spec = importlib.util.spec_from_file_location("train_step_benchmark", ROOT / "benchmarks" / "train_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if saved is not None:  # the script unsets it for itself (real kernels); the other tests need it back
        os.environ["TRITON_INTERPRET"] = saved
    return module


def _plan(bench, *argv):
    cases, tag = bench.plan(bench.parse_args(["--device", "cpu", *argv]))
    return [(c["layers"], c["hidden"], c["vocab"], c["batch"], c["seq"]) for c in cases], tag


def test_cpu_default_is_small_and_full_is_the_real_widths(bench):
    assert _plan(bench) == ([(2, 256, 8192, 4, 128), (2, 256, 8192, 8, 128)], "CPU")
    assert _plan(bench, "--full") == ([(12, 768, 50257, 8, 1024), (12, 768, 30522, 32, 128)], "CPU_full")
    assert _plan(bench, "--full", "--batch", "2", "--seq", "256") == (
        [(12, 768, 50257, 2, 256), (12, 768, 30522, 2, 256)], "CPU_full_b2_s256")
    assert _plan(bench, "--full", "--case", "gpt2", "--batch", "2") == ([(12, 768, 50257, 2, 1024)], "CPU_full_gpt2_b2")
    assert _plan(bench, "--full", "--case", "bert") == ([(12, 768, 30522, 32, 128)], "CPU_full_bert")
    assert _plan(bench, "--full", "--case", "gpt2", "--seq", "1024") == (
        [(12, 768, 50257, 8, 1024)], "CPU_full_gpt2_s1024")  # GPT-2's positions follow its rows; BERT has 512


@pytest.mark.parametrize("argv", [["--quick", "--full"], ["--batch", "0"], ["--seq", "513"], ["--warmup", "-1"],
                                  ["--case", "t5"], ["--cuda-graphs"]])  # (the device is the CPU here)
def test_bad_arguments(bench, argv):
    with pytest.raises(SystemExit) as exit_:
        bench.parse_args(["--device", "cpu", *argv])
    assert exit_.value.code == 2
