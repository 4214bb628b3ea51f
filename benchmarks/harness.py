"""A small benchmark harness: providers, cases, timing, FLOP/s or GB/s, a table, a markdown file and a plot.

A benchmark compares *providers* (ways of computing the same thing: PyTorch's, ours, someone's variant) on
a list of *cases* (the sizes to try). Each provider is one decorated function that, given a case, returns a
zero-argument callable; the harness times that callable and nothing else, so building inputs, compiling
and checking results stay outside the timed region.

Worked example: add your own kernel variant as a provider
----------------------------------------------------------

    import torch
    from benchmarks.harness import Benchmark

    bench = Benchmark(
        "matmul",                                     # file names: matmul_<device>.md / .png
        title="Matrix product",
        metric="TFLOP/s",                             # or "GB/s" with work = bytes moved
        work=lambda case: 2 * case["n"] ** 3,         # FLOPs of one call
        ceiling=989.0,                                # H100 SXM dense bf16 spec; drawn as a line
        baseline="torch",                             # adds a "torch / this" time ratio column
        setup=lambda case: {"a": torch.randn(case["n"], case["n"]), "b": torch.randn(case["n"], case["n"])},
    )

    @bench.provider("torch")
    def torch_matmul(case):
        return lambda: case["a"] @ case["b"]

    @bench.provider("mine")                           # <- your variant: one function, nothing else to edit
    def my_matmul(case):
        a, b = case["a"], case["b"]
        return lambda: my_kernel(a, b)                # return None to skip a case the variant cannot do

    results = bench.run([{"n": 256}, {"n": 512}])    # prints one line per (case, provider)
    bench.write(results, "benchmarks/results")        # matmul_<device>.md (+ .png if matplotlib is there)

Each case is a dict of parameters (they become the table's leading columns). `setup(case)` may add inputs;
its keys are passed to the providers but not shown. A provider that raises (out of memory, unsupported
shape) is recorded with its error and shown as "-"; the others go on.

Timing: the callable runs `warmup` times, then `repeats` timed runs give the median and the 20th/80th
percentiles in milliseconds. On a GPU each run is bracketed by CUDA events after the L2 cache is flushed
(or, with gpu_timer="do_bench", `triton.testing.do_bench(fn, **do_bench_args)` is used as is); on the CPU,
time.perf_counter. A provider whose callable sets `fn.grad_to_none = [tensors]` gets their .grad reset to
None before every timed run (outside the timing), as do_bench's grad_to_none does.
With `memory=True` the extra peak CUDA memory of one call (inputs excluded) is recorded in MiB.
Rates: work / median time, in the unit of `metric` (TFLOP/s = 1e12 FLOP per second, GB/s = 1e9 bytes).
"""

import datetime
import math
import os
import platform
import re
import sys
import time

import torch

UNITS = {"TFLOP/s": 1e12, "GFLOP/s": 1e9, "TB/s": 1e12, "GB/s": 1e9, "MB/s": 1e6}


# ---- the device -------------------------------------------------------------------------------------------


def device_info(device: str | None = None):
    """Name, short tag (file suffix), versions and date of the device the benchmark runs on.

    device: "cuda" or "cpu"; default the GPU when there is one. A CPU benchmark on a GPU machine passes "cpu"
    so that its results are named for the CPU, not the GPU beside it.
    """
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    on_gpu = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
    if on_gpu:
        name = torch.cuda.get_device_name()
        match = re.search(r"\b([A-Z]\d{2,4}[A-Za-z]*)\b", name)
        tag = match.group(1) if match else re.sub(r"\W+", "_", name)
    else:
        name = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
        tag = "CPU"
    return {
        "name": name,
        "tag": tag,
        "cuda": on_gpu,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": sys.version.split()[0],
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
    }


# ---- timing -----------------------------------------------------------------------------------------------


def percentile(values, q):
    """The q-th percentile (0..100) of values, interpolating linearly between the sorted neighbours."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def reset_grads(tensors):
    for t in tensors or ():
        t.grad = None


def time_cpu(fn, repeats):
    """Wall-clock times in ms of `repeats` calls."""
    times = []
    for _ in range(repeats):
        reset_grads(getattr(fn, "grad_to_none", None))
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def time_cuda(fn, repeats):
    """GPU times in ms of `repeats` calls, each between two CUDA events, the L2 cache flushed before it."""
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")  # larger than any L2 cache
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    torch.cuda.synchronize()
    for start, end in zip(starts, ends):
        reset_grads(getattr(fn, "grad_to_none", None))
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in zip(starts, ends)]


def measure_time(fn, warmup=1, repeats=5, gpu_timer="events", do_bench_args=None):
    """(median, p20, p80) in ms of fn() after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    if torch.cuda.is_available() and gpu_timer == "do_bench":
        import triton.testing

        return tuple(triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], **(do_bench_args or {}),
                                             grad_to_none=getattr(fn, "grad_to_none", None)))
    times = time_cuda(fn, repeats) if torch.cuda.is_available() else time_cpu(fn, repeats)
    return percentile(times, 50), percentile(times, 20), percentile(times, 80)


def peak_memory_mib(fn):
    """Extra peak CUDA memory of one call in MiB (what was allocated before excluded); None on the CPU."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    del out
    return peak


def fmt_rate(value):
    """1234 -> '1234', 12.34 -> '12.3', 0.01234 -> '0.0123': three significant digits below 100."""
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


# ---- the benchmark ----------------------------------------------------------------------------------------


class Result:
    """One (case, provider) measurement. Times in ms; rate in the benchmark's metric unit; peak in MiB."""

    def __init__(self, case, provider, median=None, p20=None, p80=None, work=None, rate=None, peak=None, error=None):
        self.case, self.provider = case, provider
        self.median, self.p20, self.p80 = median, p20, p80
        self.work, self.rate, self.peak, self.error = work, rate, peak, error

    @property
    def ok(self):
        return self.error is None and self.median is not None

    def __repr__(self):
        return f"Result({self.case}, {self.provider!r}, median={self.median}, rate={self.rate}, error={self.error!r})"


class Benchmark:
    """Providers registered with @bench.provider(name), run over a list of cases; see the module docstring."""

    def __init__(self, name, *, title=None, metric=None, work=None, ceiling=None, ceiling_label=None,
                 baseline=None, setup=None, memory=False, warmup=None, repeats=None, gpu_timer="events",
                 do_bench_args=None, notes=(), x=None, panels=(), log_x=False, plot_cases=None):
        if metric is not None and metric not in UNITS:
            raise ValueError(f"metric {metric!r}: one of {', '.join(UNITS)} or None")
        self.name, self.title = name, title or name
        self.metric, self.work, self.setup = metric, work, setup
        self.ceiling, self.ceiling_label = ceiling, ceiling_label
        self.baseline, self.memory, self.gpu_timer = baseline, memory, gpu_timer
        self.do_bench_args = dict(do_bench_args or {})  # e.g. {"warmup": 10, "rep": 50} (ms), do_bench's defaults
        on_gpu = torch.cuda.is_available()
        self.warmup = warmup if warmup is not None else (10 if on_gpu else 1)
        self.repeats = repeats if repeats is not None else (50 if on_gpu else 5)
        self.notes = list(notes)
        self.x, self.panels, self.log_x = x, tuple(panels), log_x  # plot: x-axis key, one panel per panels values
        self.plot_cases = plot_cases  # plot only the cases for which plot_cases(case) is true (all if None)
        self.providers = {}  # name -> (function(case) -> callable or None, work function or None)

    def provider(self, name, work=None):
        """Decorator: register fn(case) -> zero-argument callable (or None to skip the case) as `name`.
        `work` overrides the benchmark's work(case) for this provider (e.g. a variant doing fewer FLOPs)."""

        def register(fn):
            if name in self.providers:
                raise ValueError(f"provider {name!r} registered twice")
            self.providers[name] = (fn, work)
            return fn

        return register

    def run(self, cases, providers=None, verbose=True):
        """Measure every provider (or those named) on every case; returns the list of Results."""
        names = list(providers or self.providers)
        results = []
        for params in cases:
            case = {**params, **(self.setup(params) if self.setup else {})}
            for name in names:
                make, work_fn = self.providers[name]
                result = self._measure(params, name, make, work_fn or self.work, case)
                results.append(result)
                if verbose:
                    print(self.format_line(result), flush=True)
            del case
        return results

    def _measure(self, params, name, make, work_fn, case):
        try:
            fn = make(case)
            if fn is None:
                return Result(params, name, error="not applicable")
            for _ in range(self.warmup):
                fn()
            peak = peak_memory_mib(fn) if self.memory else None  # after the warm-up, before the timed runs
            median, p20, p80 = measure_time(fn, 0, self.repeats, self.gpu_timer, self.do_bench_args)
        except Exception as err:  # noqa: BLE001 - one provider failing (OOM, unsupported) must not stop the sweep
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            message = str(err).splitlines()[0][:120] if str(err) else ""
            return Result(params, name, error=f"{type(err).__name__}: {message}")
        work = work_fn(case) if work_fn else None
        rate = work / (median * 1e-3) / UNITS[self.metric] if work is not None and self.metric else None
        return Result(params, name, median, p20, p80, work, rate, peak)

    # ---- output -------------------------------------------------------------------------------------------

    def _ratio(self, result, results):
        """baseline median / this median for the same case (> 1: faster than the baseline)."""
        if not self.baseline or not result.ok:
            return None
        base = [r for r in results if r.case == result.case and r.provider == self.baseline and r.ok]
        return base[0].median / result.median if base else None

    def format_line(self, r):
        case = " ".join(f"{k}={v}" for k, v in r.case.items())
        if not r.ok:
            return f"{case:40s} {r.provider:12s} - ({r.error})"
        text = f"{case:40s} {r.provider:12s} {r.median:9.3f} ms [{r.p20:.3f}, {r.p80:.3f}]"
        if r.rate is not None:
            text += f" {fmt_rate(r.rate):>9s} {self.metric}"
        if r.peak is not None:
            text += f" {r.peak:8.0f} MiB"
        return text

    def columns(self, results):
        keys = list(dict.fromkeys(k for r in results for k in r.case))
        head = keys + ["provider", "median ms [p20, p80]"]
        if self.metric:
            head.append(self.metric)
        if self.memory:
            head.append("peak MiB")
        if self.baseline:
            head.append(f"{self.baseline} / this")
        rows = []
        for r in results:
            row = [str(r.case.get(k, "")) for k in keys] + [r.provider]
            if not r.ok:
                row += ["-"] * (len(head) - len(row))
            else:
                row.append(f"{r.median:.3f} [{r.p20:.3f}, {r.p80:.3f}]")
                if self.metric:
                    row.append("-" if r.rate is None else fmt_rate(r.rate))
                if self.memory:
                    row.append("n/a" if r.peak is None else f"{r.peak:.0f}")
                if self.baseline:
                    ratio = self._ratio(r, results)
                    row.append("-" if ratio is None else f"{ratio:.2f}x")
            rows.append(row)
        return head, rows

    def table(self, results):
        """The results as an aligned plain-text table."""
        head, rows = self.columns(results)
        widths = [max(len(str(c)) for c in col) for col in zip(head, *rows)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in [head] + rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def markdown(self, results, info=None, summary=()):
        """The results as a markdown document: device, date, versions, notes, ceiling, table, summary."""
        info = info or device_info()
        head, rows = self.columns(results)
        lines = [
            f"# {self.title}: {info['tag']}",
            "",
            f"- device: {info['name']}" + (", Triton interpreter" if os.environ.get("TRITON_INTERPRET") == "1" else ""),
            f"- date: {info['date']}",
            f"- torch {info['torch']}, triton {info['triton']}, python {info['python']}",
            f"- times: medians in ms of {self._timer_text()}, [20th, 80th] percentiles",
        ]
        if self.metric:
            lines.append(f"- {self.metric} = work / median time")
        if self.ceiling is not None:
            lines.append(f"- ceiling: {self.ceiling:.4g} {self.metric or ''}" + (f" ({self.ceiling_label})"
                                                                                if self.ceiling_label else ""))
        lines += [f"- {note}" for note in self.notes]
        lines += ["", "| " + " | ".join(head) + " |",
                  "|" + "|".join(":--" if c == "provider" else "---:" for c in head) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        if summary:
            lines += [""] + list(summary)
        return "\n".join(lines) + "\n"

    def _timer_text(self):
        if not torch.cuda.is_available():
            return f"{self.repeats} wall-clock runs after {self.warmup} warm-up"
        if self.gpu_timer == "do_bench":
            args = ", ".join(f"{k}={v}" for k, v in self.do_bench_args.items())
            return f"triton.testing.do_bench({args})" if args else "triton.testing.do_bench"
        return f"{self.repeats} CUDA-event-timed runs (L2 flushed) after {self.warmup} warm-up"

    def write(self, results, out_dir, summary=(), info=None, plot=True):
        """Write <name>_<tag>.md (and .png when matplotlib is installed) under out_dir; returns the paths."""
        info = info or device_info()
        os.makedirs(out_dir, exist_ok=True)
        md_path = os.path.join(out_dir, f"{self.name}_{info['tag']}.md")
        with open(md_path, "w") as fh:
            fh.write(self.markdown(results, info, summary))
        print(f"wrote {md_path}")
        png_path = self.plot(results, os.path.join(out_dir, f"{self.name}_{info['tag']}.png"), info) if plot else None
        return md_path, png_path

    def plot(self, results, path, info=None):
        """One panel per value of self.panels keys: rate (or time) against self.x, a line per provider, the
        ceiling as a dashed horizontal line; a second row of panels with peak memory when measured.
        Returns the path, or None when matplotlib is not installed."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib missing: no plot")
            return None
        info = info or device_info()
        ok = [r for r in results if r.ok and (self.plot_cases is None or self.plot_cases(r.case))]
        x_key = self.x or next(iter(results[0].case))
        groups = list(dict.fromkeys(tuple(r.case.get(k) for k in self.panels) for r in ok)) or [()]
        with_memory = any(r.peak is not None for r in ok)
        use_rate = self.metric is not None and any(r.rate is not None for r in ok)
        n_rows = 2 if with_memory else 1
        fig, axes = plt.subplots(n_rows, len(groups), figsize=(5 * len(groups), 4.2 * n_rows), squeeze=False)
        for col, group in enumerate(groups):
            sel = [r for r in ok if tuple(r.case.get(k) for k in self.panels) == group]
            label = " ".join(f"{k}={v}" for k, v in zip(self.panels, group))
            for row in range(n_rows):
                ax = axes[row][col]
                for name in self.providers:
                    pts = [r for r in sel if r.provider == name]
                    if not pts:
                        continue
                    ys = [r.peak if row == 1 else (r.rate if use_rate else r.median) for r in pts]
                    ax.plot([r.case[x_key] for r in pts], ys, marker="o", label=name)
                if row == 0 and use_rate and self.ceiling is not None:
                    ax.axhline(self.ceiling, color="black", linestyle="--", linewidth=0.8,
                               label=self.ceiling_label or "ceiling")
                if self.log_x:
                    ax.set_xscale("log", base=2)
                ax.set_xlabel(x_key)
                ax.set_ylabel("peak MiB" if row == 1 else (self.metric if use_rate else "median ms"))
                ax.set_title(f"{label or self.title} ({info['tag']})", fontsize=9)
                if ax.get_legend_handles_labels()[0]:
                    ax.legend(fontsize=7)
        if self.panels:
            fig.suptitle(self.title)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        print(f"wrote {path}")
        return path
