"""Multi-process training: ShardedBatches' rounds and positions (in one process, ranks simulated), then real
two-process gloo runs under torchrun: DDP equals one process with the same global batch (also with gradient
accumulation), and a DDP run stopped and resumed equals one that never stopped."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scratchformer.tokenize import ExampleLoader, TokenBlockLoader
from scratchformer.train.distributed import ShardedBatches

ROOT = Path(__file__).resolve().parents[2]


def _collate(rows):
    ids = torch.stack(rows)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _data(kind: str):
    """The same stream for every rank: `list` (no position of its own), `blocks` / `examples` (resumable)."""
    g = torch.Generator().manual_seed(0)
    if kind == "blocks":
        return TokenBlockLoader(torch.randint(0, 97, (500,), generator=g).numpy(), batch_size=2, block_size=9, seed=5)
    if kind == "examples":  # 12 examples, 2 a batch: 6 batches, 3 rounds of two per epoch
        rows = [torch.randint(0, 97, (9,), generator=g) for _ in range(12)]
        return ExampleLoader(rows, _collate, batch_size=2, seed=3)
    return [_collate(list(torch.randint(0, 97, (2, 9), generator=g))) for _ in range(10)]


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))


def test_sharded_batches_take_one_batch_of_each_round():
    stream = [{"input_ids": torch.tensor([i])} for i in range(7)]  # 3 full rounds of two, then one batch alone
    ranks = [[int(b["input_ids"]) for b in ShardedBatches(stream, r, 2)] for r in range(2)]
    assert ranks == [[0, 2, 4], [1, 3, 5]]  # the incomplete last round is dropped by every rank
    assert [int(b["input_ids"]) for b in ShardedBatches(stream, 1, 3)] == [1, 4]


@pytest.mark.parametrize("kind", ["blocks", "examples"])
def test_sharded_position_is_every_ranks_and_resumes_exactly(kind):
    """After k batches each, both ranks' loaders stand at the same position; loading rank 0's (what a
    checkpoint holds) into fresh loaders continues every rank with exactly the batches of the unbroken run."""
    world, k, more = 2, 1, 2  # within the first epoch of `examples` (3 rounds)
    ranks = [ShardedBatches(_data(kind), r, world) for r in range(world)]
    streams = [iter(s) for s in ranks]
    for s in streams:
        _take(s, k)
    saved = ranks[0].state_dict()
    assert all(r.state_dict() == saved for r in ranks)
    unbroken = [_take(s, more) for s in streams]
    for r in range(world):
        resumed = ShardedBatches(_data(kind), r, world)
        resumed.load_state_dict(saved)
        assert _same(_take(iter(resumed), more), unbroken[r]), f"rank {r}"


# ---- real processes ----------------------------------------------------------------------------------------

DDP_SCRIPT = r"""
import json, os, sys
import torch
from scratchformer import CausalLM
from scratchformer.train import Trainer, TrainConfig
from tests.train.test_distributed import _data

folder, result, runs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
results = {}
for name, run in runs.items():  # one after another in the same process group
    model = CausalLM.from_pretrained(folder, hidden_dropout=0.0, attention_dropout=0.0, embedding_dropout=0.0)
    cfg = TrainConfig(out=run["out"], max_steps=6, grad_accum=run.get("accum", 1), lr=3e-3, log_every=1,
                      save_every=run.get("save_every", 0), progress=False, device="cpu")
    history = Trainer(model, cfg, train_data=_data(run.get("data", "list"))).train(
        resume=run.get("resume", False), stop_after=run.get("stop_after"))
    results[name] = {"losses": [r["loss"] for r in history if "loss" in r],
                     "weight": model.body.blocks[0].mlp.up.weight.sum().item()}
if int(os.environ.get("RANK", "0")) == 0:
    json.dump(results, open(result, "w"))
"""


def _free_port() -> int:
    """A port nobody listens on now, so that two runs of this test (or anything else) never share a rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_training(folder, tmp_path: Path, runs: dict, processes: int) -> dict:
    """Run DDP_SCRIPT's `runs` ({name: settings}) in `processes` gloo processes under torchrun (1: plainly);
    returns {name: {"losses": [...], "weight": float}} as rank 0 saw them."""
    script, result = tmp_path / "ddp.py", tmp_path / f"result-{processes}.json"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                 "--master_port", str(_free_port())] if processes > 1 else [sys.executable])
    done = subprocess.run([*launcher, str(script), str(folder), str(result), json.dumps(runs)], env=env,
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return json.loads(result.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("accum", [1, 2])
def test_ddp_two_processes_equal_one(hf_tiny, tmp_path, accum):
    """Two gloo processes with `accum` micro-batches each per step equal one process accumulating all 2 x accum
    micro-batches of the same stream (the same global batch)."""
    from tests.train.test_trainer import assert_losses_close  # here: the DDP script imports this module, lightly

    folder, _ = hf_tiny("gpt2", no_dropout=True)
    ddp = run_training(folder, tmp_path, {"run": {"out": str(tmp_path / "ddp"), "accum": accum}}, 2)["run"]
    one = run_training(folder, tmp_path, {"run": {"out": str(tmp_path / "one"), "accum": 2 * accum}}, 1)["run"]
    assert len(ddp["losses"]) == 6
    assert_losses_close(ddp["losses"], one["losses"])
    assert abs(ddp["weight"] - one["weight"]) <= 1e-5 * abs(one["weight"])


@pytest.mark.slow
def test_ddp_resume_equals_straight(hf_tiny, tmp_path):
    """Under DDP, 3 steps, stop, resume, 3 more equals 6 straight: losses and final weights bit-identical, for a
    plain list (resumed by skipping), a TokenBlockLoader and an ExampleLoader (stopped at an epoch's end)."""
    folder, _ = hf_tiny("gpt2", no_dropout=True)
    runs = {}
    for kind in ("list", "blocks", "examples"):
        runs[f"{kind}-straight"] = {"out": str(tmp_path / kind / "straight"), "data": kind}
        split = {"out": str(tmp_path / kind / "split"), "data": kind, "save_every": 3}
        runs[f"{kind}-first"] = {**split, "stop_after": 3}
        runs[f"{kind}-second"] = {**split, "resume": True}
    results = run_training(folder, tmp_path, runs, processes=2)
    for kind in ("list", "blocks", "examples"):
        first, second = results[f"{kind}-first"]["losses"], results[f"{kind}-second"]["losses"]
        assert len(first) == 3 and len(second) == 3, kind
        assert first + second == results[f"{kind}-straight"]["losses"], kind
        final = [(tmp_path / kind / run / "final" / "model.safetensors").read_bytes() for run in ("straight", "split")]
        assert final[0] == final[1], kind
