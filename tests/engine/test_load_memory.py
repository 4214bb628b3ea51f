"""Loading never holds a second copy of the weights: measured on a ~64 MB random GPT-2 in a fresh process.

`from_pretrained` builds the model on the meta device, allocates it once (`to_empty`) and copies the checkpoint
in one tensor at a time. What would break that (a state dict read in full, a model materialised in fp32 and
then cast, transposed Conv1D copies kept around) shows up as anonymous memory beyond the model itself.

How it is measured, and why this way: safetensors maps the file and its tensors are views of that mapping,
so the file's pages count as *file-backed* resident memory (page cache, shared, reclaimable), not as a copy.
The child process therefore tracks `RssAnon` from /proc/self/status: at every `get_tensor` (through a spy on
the checkpoint module's `safe_open`), from a sampling thread that catches transients between reads, and at
the end. `MALLOC_MMAP_THRESHOLD_` is fixed so that glibc returns every freed large buffer to the kernel at
once (its default adaptive threshold would keep freed tensors in the heap and blur the numbers).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scratchformer.engine import CausalLM, ModelConfig

ROOT = Path(__file__).resolve().parents[2]
MiB = 2**20
MARGIN = 8 * MiB  # allocator and interpreter noise; measured well under 1 MiB

CHILD = r'''
import gc, json, re, sys, threading, time, weakref
from pathlib import Path
import torch
import scratchformer.engine.checkpoint as checkpoint
from scratchformer.engine import CausalLM

def anon():
    return int(re.search(r"RssAnon:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024

class Peak:
    """The largest RssAnon seen: sampled by a thread every 0.5 ms and by `sample()` at chosen points."""
    def __enter__(self):
        self.base = self.peak = anon()
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self
    def _run(self):
        while self.running:
            self.sample()
            time.sleep(0.0005)
    def sample(self):
        self.peak = max(self.peak, anon())
    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.sample()

peak = None
alive_at_read = []  # how many earlier checkpoint tensors were still referenced at each read
real_safe_open = checkpoint.safe_open

class SpyFile:
    def __init__(self, *args, **kwargs):
        self._cm, self._returned = real_safe_open(*args, **kwargs), []
    def __enter__(self):
        self._f = self._cm.__enter__()
        return self
    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)
    def keys(self):
        return self._f.keys()
    def get_slice(self, key):
        return self._f.get_slice(key)
    def get_tensor(self, key):
        alive_at_read.append(sum(ref() is not None for ref in self._returned))
        tensor = self._f.get_tensor(key)
        self._returned.append(weakref.ref(tensor))
        if peak is not None:
            peak.sample()
        return tensor

checkpoint.safe_open = SpyFile
big, tiny = sys.argv[1], sys.argv[2]
CausalLM.from_pretrained(tiny)  # lazy imports and allocator set-up happen here, not in the measured load
out = {}
for dtype in ("float32", "bfloat16"):
    gc.collect()
    alive_at_read.clear()
    with Peak() as peak:
        model = CausalLM.from_pretrained(big, dtype=dtype)
    out[dtype] = dict(growth=peak.peak - peak.base, model=sum(p.nbytes for p in model.parameters()),
                      reads=len(alive_at_read), max_alive=max(alive_at_read), params=len(list(model.parameters())))
    del model
    peak = None
gc.collect()
with Peak() as control:  # the sampler does see a short-lived copy of the model's size
    copy = torch.ones(out["float32"]["model"] // 4)
    time.sleep(0.05)
    del copy
out["control_growth"] = control.peak - control.base
print(json.dumps(out))
'''


def _gpt2(vocab, hidden, layers, positions):
    return ModelConfig(model_type="gpt2", vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=8,
                       intermediate_size=4 * hidden, max_positions=positions, type_vocab_size=0, norm_placement="pre",
                       fused_qkv=True, activation="gelu_new", norm_eps=1e-5, pad_token_id=None)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc for RssAnon")
def test_loading_makes_no_extra_copy_of_the_weights(tmp_path):
    torch.manual_seed(0)
    big = CausalLM.from_config(_gpt2(vocab=8003, hidden=512, layers=4, positions=128))  # 16.0M params, 64 MB
    largest = max(p.nbytes for p in big.parameters())  # the word embeddings, 16.4 MB
    big.save_pretrained(tmp_path / "big")
    del big
    CausalLM.from_config(_gpt2(vocab=11, hidden=16, layers=1, positions=8)).save_pretrained(tmp_path / "tiny")

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "big"), str(tmp_path / "tiny")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])

    for dtype, r in result.items():
        if dtype == "control_growth":
            continue
        # Read one at a time: one get_tensor per parameter, and at most the previous tensor still referenced.
        assert r["reads"] == r["params"] and r["max_alive"] <= 1, (dtype, r)
        # The model once, plus at most one checkpoint tensor in flight. A second copy of the weights (fp32
        # materialised before a bf16 cast: +64 MB; a state dict of transposed or cast copies) breaks this.
        bound = r["model"] + largest + MARGIN
        assert r["growth"] <= bound, f"{dtype}: anonymous memory grew {r['growth'] / MiB:.1f} MiB, bound {bound / MiB:.1f}"
        assert r["growth"] >= 0.9 * r["model"]  # the measurement sees the model itself
    # And it would see a full extra copy even if it lived only briefly.
    assert result["control_growth"] >= 0.9 * result["float32"]["model"]
