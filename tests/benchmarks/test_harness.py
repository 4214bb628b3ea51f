"""The benchmark harness on a tiny CPU case: two providers, one doing ten times the work of the other."""

import importlib.util
import time

import pytest

from benchmarks.harness import Benchmark, percentile

FLOPS = 1_000_000.0


def make_bench(**kwargs):
    bench = Benchmark("toy", title="Toy benchmark", metric="GFLOP/s", work=lambda case: FLOPS * case["n"],
                      baseline="fast", x="n", warmup=1, repeats=3, **kwargs)

    @bench.provider("fast")
    def fast(case):
        return lambda: time.sleep(0.001 * case["n"])

    @bench.provider("slow")
    def slow(case):
        return lambda: time.sleep(0.01 * case["n"])

    return bench


def test_percentile_interpolates():
    assert percentile([3, 1, 2], 50) == 2
    assert percentile([0, 10], 20) == pytest.approx(2)
    assert percentile([5], 80) == 5


def test_run_table_markdown_and_plot(tmp_path):
    bench = make_bench()
    results = bench.run([{"n": 1}, {"n": 2}], verbose=False)
    assert [(r.case["n"], r.provider) for r in results] == [(1, "fast"), (1, "slow"), (2, "fast"), (2, "slow")]
    for r in results:
        assert r.ok and 0 < r.p20 <= r.median <= r.p80
        assert r.rate == pytest.approx(FLOPS * r.case["n"] / (r.median * 1e-3) / 1e9)  # GFLOP/s = flops / median
    for n in (1, 2):
        fast, slow = (next(r for r in results if r.case["n"] == n and r.provider == p) for p in ("fast", "slow"))
        assert fast.median < slow.median and fast.rate > slow.rate

    table = bench.table(results)
    assert "fast" in table and "slow" in table and "GFLOP/s" in table and "fast / this" in table

    md_path, png_path = bench.write(results, str(tmp_path), summary=["goal: fast wins"])
    text = open(md_path).read()
    assert md_path.endswith("toy_CPU.md")
    assert "| fast |" in text and "| slow |" in text and "goal: fast wins" in text
    assert "- date: " in text and "torch " in text and "triton " in text
    if importlib.util.find_spec("matplotlib"):
        assert png_path and (tmp_path / "toy_CPU.png").stat().st_size > 0
    else:
        assert png_path is None


def test_failing_and_skipped_providers_do_not_stop_the_sweep():
    bench = make_bench()

    @bench.provider("broken")
    def broken(case):
        raise MemoryError("out of memory")

    @bench.provider("picky")
    def picky(case):
        return None if case["n"] == 1 else (lambda: None)

    results = bench.run([{"n": 1}], verbose=False)
    by_name = {r.provider: r for r in results}
    assert by_name["broken"].error.startswith("MemoryError") and by_name["picky"].error == "not applicable"
    assert by_name["fast"].ok and "| broken | - |" in bench.markdown(results)


def test_provider_names_are_unique():
    bench = make_bench()
    with pytest.raises(ValueError):
        bench.provider("fast")(lambda case: None)


def test_grad_to_none_resets_gradients_before_each_timed_run():
    import torch

    x = torch.ones(3, requires_grad=True)
    bench = Benchmark("grads", warmup=2, repeats=4)
    seen = []

    @bench.provider("backward")
    def backward(case):
        def run():
            seen.append(x.grad is None)
            (x * 2).sum().backward()

        run.grad_to_none = [x]
        return run

    [result] = bench.run([{"n": 1}], verbose=False)
    assert result.ok and seen == [True, False] + [True] * 4  # warm-up calls accumulate; timed runs start clean
