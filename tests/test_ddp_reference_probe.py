"""Two-rank DDP on the CPU (gloo) against references computed in one process.

One torchrun start runs three phases in the same two ranks (the process group kept between
them): 3 iterations with batch norm; the same with a NaN loss on rank 1 at iteration 2; 40
deterministic iterations, the uninterrupted run for the resumption test. The references:

- weights: one process stepping with ``train.accumulate: 2`` on batch k of rank 0 then batch
  k of rank 1 (the loss of each batch / 2, gradients summed: the mean of the ranks'
  gradients, which is what DDP's all-reduce makes of each rank's per-batch mean loss), with
  batch norm's running statistics kept as rank 0's alone (DDP broadcasts rank 0's at every
  forward; only rank 0's are saved). SGD, not Adam: Adam turns the float noise of a zero
  gradient (a convolution's bias before batch norm) into a full step of +-lr.
- batches: ``SampleMaker.batch(seed, rank, k)``, the documented (seed, rank, k) stream.
- writes: every file operation of rank 1 under the run directories, recorded in rank 1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import sigterm_after_first_log
from torch import nn

RECIPE = """\
name: ddp_probe
seed: 3
data:
  sources:
    a: {type: synthetic, shape: [12, 48, 48], seed: 1}
model: {type: rsunet, widths: [4, 8], norm: batch}
tasks:
  affinity:
    target: {type: affinity}
train:
  patch: [4, 16, 16]
  batch_size: 2
  iterations: 3
  optimizer: {type: sgd, lr: 0.5}
  checkpoint_every: 1
  keep_checkpoints: 5
  validate_every: 0
  image_every: 0
  log_every: 1
  workers: 0
"""

LONG = ["train.iterations=40", "train.checkpoint_every=5", "train.deterministic=true"]
"""The run stopped by SIGTERM and resumed, and its uninterrupted twin."""

RANKS = """\
import builtins, hashlib, io, json, os, sys, tempfile
from pathlib import Path
import torch
import torch.distributed as dist
from emrun.losses import LossResult
from emrun.recipe import load_recipe
from emrun.train import distributed, trainer as trainer_module
from emrun.train.trainer import Trainer

recipe, out, long = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
rank = int(os.environ["RANK"])
distributed.teardown = lambda world: None  # one process group for every phase
drawn, writes = [], []
real_batches = trainer_module.train_batches

def recording_batches(recipe, *, rank, start, **kw):
    drawn.append({"rank": rank, "start": start, "images": []})
    for batch in real_batches(recipe, rank=rank, start=start, **kw):
        drawn[-1]["images"].append(hashlib.sha256(batch["image"].numpy().tobytes()).hexdigest())
        yield batch

trainer_module.train_batches = recording_batches
root = str(out)

def audited(real, name, writing):
    def call(*args, **kwargs):
        path = os.fspath(args[0]) if args and isinstance(args[0], (str, os.PathLike)) else ""
        if str(path).startswith(root) and writing(args, kwargs):
            writes.append(f"{name} {path}")
        return real(*args, **kwargs)
    return call

def mode_writes(args, kwargs):
    mode = args[1] if len(args) > 1 else kwargs.get("mode", "r")
    return any(c in str(mode) for c in "wax+")

def flags_write(args, kwargs):
    flags = args[1] if len(args) > 1 else kwargs.get("flags", 0)
    return bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))

if rank != 0:
    builtins.open = io.open = audited(builtins.open, "open", mode_writes)
    os.open = audited(os.open, "os.open", flags_write)
    for name in ("replace", "rename", "unlink", "remove", "mkdir", "makedirs", "rmdir"):
        setattr(os, name, audited(getattr(os, name), name, lambda a, k: True))

def run(name, overrides, nan_call=None):
    trainer = Trainer(load_recipe(recipe, overrides), out / name, device="cpu")
    states, calls = [], []
    step = trainer.step
    def recorded(batches):
        result = step(batches)
        states.append({k: v.detach().clone() for k, v in trainer.model.state_dict().items()})
        return result
    trainer.step = recorded
    if nan_call is not None:
        real = trainer.losses["affinity"]
        def loss(logits, target, mask):
            calls.append(1)
            result = real(logits, target, mask)
            if rank == 1 and len(calls) == nan_call:
                return LossResult(result.loss * float("nan"), result.valid)
            return result
        trainer.losses["affinity"] = loss
    result = trainer.fit()
    return {"states": states, "iteration": result.iteration, "nonfinite": result.nonfinite_steps,
            "batches": trainer.batches_done}

saved = {"a": run("a", []), "b": run("b", [], nan_call=2)}
run("c", long)
for name, value in saved.items():
    torch.save(value, out / f"{name}-rank{rank}.pt")
found = list(writes)
if rank != 0:  # the audit sees what a checkpoint save does: a temporary file, then a rename
    fd, temp = tempfile.mkstemp(dir=out, prefix=".audit")
    os.close(fd)
    os.replace(temp, out / "audit-rank1")
    (out / "audit-rank1.txt").write_text("x")
(out / f"drawn-rank{rank}.json").write_text(json.dumps(
    {"drawn": drawn, "writes": found, "audit": writes[len(found):]}))
dist.destroy_process_group()
"""


def torchrun(script: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """``script ARGS`` as 2 CPU ranks (gloo); a rare abort in gloo's teardown on a loaded
    host (as tests/test_trainer.py sees it) is retried once."""
    for _ in range(2):
        done = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone",
             "--nproc_per_node=2", str(script), *args],
            capture_output=True, text=True, timeout=timeout,
            env={**os.environ, "OMP_NUM_THREADS": "1"})
        if done.returncode == 0 or "terminate called without an active exception" not in \
                done.stderr:
            break
    return done


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of the three phases' runs and what each rank recorded."""
    folder = tmp_path_factory.mktemp("ddp")
    (folder / "ranks.py").write_text(RANKS)
    (folder / "recipe.yaml").write_text(RECIPE)
    out = folder / "out"
    out.mkdir()
    done = torchrun(folder / "ranks.py", str(folder / "recipe.yaml"), str(out), json.dumps(LONG))
    assert done.returncode == 0, done.stderr[-3000:]
    return folder


class RankZeroBuffers(nn.Module):
    """The model, run on batches rank 0, rank 1, rank 0, ...: batch norm's running statistics
    are put back, before the next forward, as they were before each rank-1 batch (in DDP
    rank 1's own are overwritten by rank 0's broadcast at every forward)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.calls = model, 0
        self.pending: list[torch.Tensor] | None = None

    def settle(self, keep: bool = True) -> None:
        if self.pending is not None and keep:
            with torch.no_grad():
                for buffer, before in zip(self.model.buffers(), self.pending, strict=True):
                    buffer.copy_(before)
        self.pending = None

    def forward(self, x: torch.Tensor) -> Any:
        self.settle()  # not in place after the forward: autograd saved these buffers
        if self.calls % 2:
            self.pending = [b.detach().clone() for b in self.model.buffers()]
        self.calls += 1
        return self.model(x)


def reference(folder: Path, run: str, batches: int, nan_call: int | None = None
              ) -> list[dict[str, torch.Tensor]]:
    """The model's state after each step of one process stepping on both ranks' batches."""
    from emrun.data.loader import to_tensors
    from emrun.data.samples import SampleMaker
    from emrun.losses import LossResult
    from emrun.recipe import load_recipe
    from emrun.train.trainer import Trainer

    loaded = load_recipe(folder / "recipe.yaml", ["train.accumulate=2"])
    maker = SampleMaker(loaded.recipe)
    stream = iter([to_tensors(maker.batch(loaded.recipe.seed, rank, k))
                   for k in range(batches) for rank in (0, 1)])
    trainer = Trainer(loaded, folder / run, device="cpu")
    wrapper = RankZeroBuffers(trainer.model)
    trainer.forward_model = wrapper
    states: list[dict[str, torch.Tensor]] = []
    step = trainer.step

    def recorded(source: Any) -> Any:
        result = step(source)
        wrapper.settle(keep=result is not None)  # a skipped step put the buffers back itself
        states.append({k: v.detach().clone() for k, v in trainer.model.state_dict().items()})
        return result

    trainer.step = recorded  # type: ignore[method-assign]
    if nan_call is not None:
        real, calls = trainer.losses["affinity"], []

        def loss(logits: Any, target: Any, mask: Any) -> Any:
            calls.append(1)
            result = real(logits, target, mask)
            if len(calls) == nan_call:
                return LossResult(result.loss * float("nan"), result.valid)
            return result

        trainer.losses["affinity"] = loss
    trainer.fit(stream)
    return states


def _parts(state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    buffers = [k for k in state if "running_" in k or "num_batches_tracked" in k]
    return [k for k in state if k not in buffers], buffers


def _largest(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], keys: list[str]) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in keys)


def _rank(folder: Path, run: str, rank: int) -> dict[str, Any]:
    return torch.load(folder / "out" / f"{run}-rank{rank}.pt", weights_only=True)


def test_after_one_and_k_steps_the_ranks_hold_the_mean_gradient_step(ranks):
    """After each of 3 steps both ranks hold the same parameters, bit for bit, and they are
    (to float rounding) those of one process stepping on the 4 samples the ranks drew, with
    the mean of the ranks' per-batch losses; rank 0's batch norm statistics are those of
    its own batches, and they are what the checkpoint saves."""
    expected = reference(ranks, "ref_a", batches=3)
    zero, one = _rank(ranks, "a", 0), _rank(ranks, "a", 1)
    assert (zero["iteration"], zero["nonfinite"], zero["batches"]) == (3, 0, 3)
    assert (one["iteration"], one["nonfinite"], one["batches"]) == (3, 0, 3)
    assert len(expected) == len(zero["states"]) == len(one["states"]) == 3
    params, buffers = _parts(expected[0])
    assert buffers, "the probe's model has batch norm"
    initial = expected[0]
    for k, (want, got0, got1) in enumerate(zip(expected, zero["states"], one["states"],
                                               strict=True)):
        assert all(torch.equal(got0[p], got1[p]) for p in params), f"step {k + 1}"
        assert _largest(want, got0, params) < 1e-5, (k + 1, _largest(want, got0, params))
        assert _largest(want, got0, buffers) < 1e-5, (k + 1, _largest(want, got0, buffers))
    assert _largest(initial, expected[-1], params) > 0.1  # the steps moved the weights
    saved = torch.load(ranks / "out" / "a" / "checkpoints" / "last.pt", weights_only=True)
    assert all(torch.equal(saved["model"][k], zero["states"][-1][k]) for k in saved["model"])
    tracked = [k for k in buffers if k.endswith("num_batches_tracked")]
    assert tracked and all(int(saved["model"][k]) == 3 for k in tracked)


def test_each_rank_draws_its_own_seed_rank_k_batches(ranks):
    """Rank r's batch k is ``SampleMaker.batch(seed, r, k)`` (README: 'a pure function of
    (seed, rank, k)'); the two ranks' batches differ, so 2 ranks see 2 x batch_size samples
    per iteration; a skipped step moves both streams on."""
    import hashlib

    import numpy as np

    from emrun.data.samples import SampleMaker
    from emrun.recipe import load_recipe

    recipe = load_recipe(ranks / "recipe.yaml", []).recipe
    maker = SampleMaker(recipe)

    def digest(rank: int, k: int) -> str:
        image = maker.batch(recipe.seed, rank, k)["image"]
        return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()

    records = {rank: json.loads((ranks / "out" / f"drawn-rank{rank}.json").read_text())["drawn"]
               for rank in (0, 1)}
    for rank, drawn in records.items():
        assert [d["rank"] for d in drawn] == [rank] * 3 and [d["start"] for d in drawn] == [0] * 3
        assert drawn[0]["images"] == [digest(rank, k) for k in range(3)]  # phase a
        assert drawn[1]["images"] == [digest(rank, k) for k in range(4)]  # b: one skipped
    assert not set(records[0][0]["images"]) & set(records[1][0]["images"])


def test_only_rank_0_writes_checkpoints_logs_and_the_recipe_copy(ranks):
    found = json.loads((ranks / "out" / "drawn-rank1.json").read_text())
    assert found["writes"] == []
    assert any(".audit" in line for line in found["audit"])  # the audit sees a save's steps
    assert any("audit-rank1.txt" in line for line in found["audit"])
    run = ranks / "out" / "a"
    assert (run / "recipe.yaml").is_file() and (run / "events.jsonl").is_file()
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert [e.get("iteration") for e in events if "iteration" in e] == [1, 2, 3]  # once each
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "iter_0000001.pt", "iter_0000002.pt", "iter_0000003.pt", "last.pt"]


def test_a_nan_loss_on_rank_1_skips_the_step_as_one_process_would(ranks):
    """NaN on rank 1 at iteration 2: both ranks skip it (weights, momentum and batch norm
    statistics as before it), then step on batch 2 and 3, as one process stepping on both
    ranks' batches and skipping the same step."""
    expected = reference(ranks, "ref_b", batches=4, nan_call=4)  # rank 1's second batch
    zero, one = _rank(ranks, "b", 0), _rank(ranks, "b", 1)
    assert (zero["iteration"], zero["nonfinite"], zero["batches"]) == (3, 1, 4)
    assert (one["iteration"], one["nonfinite"], one["batches"]) == (3, 1, 4)
    params, buffers = _parts(expected[0])
    for k, (want, got0, got1) in enumerate(zip(expected, zero["states"], one["states"],
                                               strict=True)):
        assert all(torch.equal(got0[p], got1[p]) for p in params), f"call {k + 1}"
        assert _largest(want, got0, params + buffers) < 1e-5, (k + 1, _largest(
            want, got0, params + buffers))
        assert all(torch.isfinite(got1[b].float()).all() for b in buffers)
    assert all(torch.equal(zero["states"][0][k], zero["states"][1][k]) for k in params)


@pytest.mark.slow
def test_sigterm_to_the_group_then_resume_gives_the_uninterrupted_weights(ranks, tmp_path):
    """`emrun train --gpus 2 --device cpu`, SIGTERM to its process group after the first log
    line, then `--resume`: bit for bit the weights of the uninterrupted two-rank run. Batch
    norm's running statistics, each rank's own between DDP's broadcasts, are not taken for
    ranks out of sync at the checkpoints (that stopped every such run at its first), and
    channels-last 1x1x1 weights raise no DDP stride warning."""
    run = tmp_path / "run"
    args = ["train", str(ranks / "recipe.yaml"), "--run-dir", str(run), "--gpus", "2",
            "--device", "cpu", *(x for o in LONG for x in ("-o", o))]
    stopped = sigterm_after_first_log(args, run / "events.jsonl", group=True)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    kept = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["iteration"]
    assert 0 < kept < 40, kept  # stopped midway (by the signal's checkpoint, or an earlier)
    resumed = subprocess.run([sys.executable, "-m", "emrun", *args, "--resume"],
                             capture_output=True, text=True, timeout=180,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "ranks in sync" in resumed.stdout + resumed.stderr
    assert "Grad strides do not match" not in stopped.stderr + resumed.stderr
    mine = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    whole = torch.load(ranks / "out" / "c" / "checkpoints" / "last.pt", weights_only=True)
    assert mine["iteration"] == whole["iteration"] == 40
    assert all(torch.equal(mine["model"][k], whole["model"][k]) for k in whole["model"])
    for a, b in zip(mine["optimizer"]["state"].values(), whole["optimizer"]["state"].values(),
                    strict=True):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])


RACE = """\
import datetime, os, signal, sys, time
from pathlib import Path
import torch.distributed as dist
from emrun.recipe import load_recipe
from emrun.train.trainer import Trainer

recipe, run, flag = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
rank = int(os.environ["RANK"])
init = dist.init_process_group  # a mismatched collective fails in 4 s, not gloo's 30 min
dist.init_process_group = lambda *a, **k: init(*a, timeout=datetime.timedelta(seconds=4), **k)
trainer = Trainer(load_recipe(recipe, ["train.iterations=6", "train.checkpoint_every=100"]),
                  run, device="cpu")
if rank == 1:  # rank 1 has less to do after a step and is first into the next one: as
    stop = trainer._stop  # far as the ranks' agreement on stopping (before, into the step)
    def entering(signals):
        if trainer.iteration == 2:
            flag.write_text(str(os.getpid()))
        return stop(signals)
    trainer._stop = entering
else:  # rank 0 is still writing iteration 2's log line when the group's SIGTERM comes
    log = trainer._log
    def logged(*args):
        log(*args)
        if trainer.iteration == 2:
            deadline = time.time() + 30
            while not flag.exists() and time.time() < deadline:
                time.sleep(0.01)
            time.sleep(0.2)
            os.kill(int(flag.read_text()), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
    trainer._log = logged
result = trainer.fit()
print(f"rank {rank}: iteration {result.iteration}, interrupted {result.interrupted}", flush=True)
"""


@pytest.mark.slow
def test_a_group_sigterm_between_ranks_steps_stops_both_at_one_iteration(ranks, tmp_path):
    """The same SIGTERM reaches both ranks at once, but not at the same point of the loop:
    rank 1, with nothing to write, is ahead (it was already in its next step, where rank 0's
    checkpoint's collective met its forward's: a hang, a crash, no stop checkpoint). Both
    ranks now agree on stopping at one point of each iteration, stop after the same
    iteration and write the stop's checkpoint."""
    script = tmp_path / "race.py"
    script.write_text(RACE)
    done = torchrun(script, str(ranks / "recipe.yaml"), str(tmp_path / "run"),
                    str(tmp_path / "flag"), timeout=120)
    lines = sorted(line for line in done.stdout.splitlines() if line.startswith("rank "))
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(lines) == 2 and lines[0][len("rank 0"):] == lines[1][len("rank 1"):], lines
    assert "interrupted SIGTERM" in lines[0]
