"""The training loop both trainers run: cadence of logs, checkpoints and grids; stops (signal, deadline) agreed by
every rank, with a checkpoint; the NaN guard; resuming optimizers with the config's settings."""

import itertools
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from PIL import Image

from latent_diffusion.config import TrainConfig
from latent_diffusion.runtime import libc_function
from latent_diffusion.training import loop
from latent_diffusion.training.distributed import DistributedContext
from latent_diffusion.training.faults import NonFiniteGuard, StopSignals
from latent_diffusion.training.loop import finite_everywhere, resume_optimizers, train_loop
from latent_diffusion.training.state import resume_training_state, save_training_state


class _Recorder:
    """A trainer that trains nothing and records what the loop asks of it; `losses` gives each step's loss."""

    label, grid_name, postfix = "test", "grids", {"loss": ".3f"}

    def __init__(self, losses=None, during_step=None):
        self.guard = NonFiniteGuard(5, "test")
        self.losses, self.during_step = losses or {}, during_step or (lambda step: None)
        self.steps, self.saves, self.optimizer = [], [], torch.optim.SGD([torch.zeros(1, requires_grad=True)])

    def batches(self, step):
        return itertools.count(step)

    def train_step(self, batch, step, lr):
        assert batch == step
        self.steps.append(step)
        self.during_step(step)
        finite_everywhere(DistributedContext(), self.guard, self.losses.get(step, 1.0), step, [self.optimizer])

    def figures(self):
        return {"loss": 1.0}

    def save(self, step, checkpoint, samples):
        self.saves.append((step, checkpoint, samples))
        return Image.new("RGB", (4, 4)) if samples else None


def _config(**kw):
    return TrainConfig(**{"batch_size": 1, "max_steps": 7, "log_every": 3, "checkpoint_every": 4, "image_every": 2,
                          **kw})


def _logged(root):
    return [json.loads(line) for line in (root / "log.jsonl").read_text().splitlines()]


def test_logs_checkpoints_and_grids_come_on_their_cadence_and_at_the_last_step(tmp_path):
    trainer = _Recorder()
    last = train_loop(trainer, _config(), DistributedContext(), tmp_path, 0, StopSignals(), progress=False)
    assert trainer.steps == list(range(7))
    assert [line["step"] for line in _logged(tmp_path)] == [1, 3, 6, 7]
    assert trainer.saves == [(2, False, True), (4, True, True), (6, False, True), (7, True, True)]
    assert last["step"] == 7 and "stopped" not in last


def test_a_resumed_run_continues_at_its_step_and_one_at_max_steps_does_nothing(tmp_path):
    trainer = _Recorder()
    train_loop(trainer, _config(), DistributedContext(), tmp_path, 5, StopSignals(), progress=False)
    assert trainer.steps == [5, 6] and [line["step"] for line in _logged(tmp_path)] == [6, 7]
    done = _Recorder()
    assert train_loop(done, _config(), DistributedContext(), tmp_path, 7, StopSignals(), progress=False) == {}
    assert done.steps == [] and done.saves == []


def test_a_stop_signal_ends_the_run_before_the_next_step_with_a_checkpoint_and_a_grid(tmp_path):
    signals = StopSignals()
    trainer = _Recorder(during_step=lambda step: setattr(signals, "requested", "SIGTERM") if step == 1 else None)
    last = train_loop(trainer, _config(), DistributedContext(), tmp_path, 0, signals, progress=False)
    assert trainer.steps == [0, 1]
    assert trainer.saves[-1] == (2, True, True)
    assert last["step"] == 2 and last["stopped"] == "SIGTERM"


def test_max_minutes_ends_the_run_with_a_checkpoint(tmp_path, monkeypatch):
    clock = {"now": 1000.0}
    monkeypatch.setattr(loop, "monotonic", lambda: clock["now"])
    trainer = _Recorder(during_step=lambda step: clock.update(now=clock["now"] + 25))  # 25 s a step
    last = train_loop(trainer, _config(max_minutes=1.0), DistributedContext(), tmp_path, 0, StopSignals(),
                      progress=False)
    assert trainer.steps == [0, 1, 2]  # 75 s > 60 s before the fourth
    assert trainer.saves[-1] == (3, True, True)
    assert last["step"] == 3 and last["stopped"] == "max_minutes"


def test_non_finite_losses_skip_their_step_are_counted_and_too_many_in_a_row_end_the_run(tmp_path):
    trainer = _Recorder(losses={1: float("nan"), 2: float("inf")})
    last = train_loop(trainer, _config(max_steps=3, log_every=1), DistributedContext(), tmp_path, 0, StopSignals(),
                      progress=False)
    assert [line["skipped_steps"] for line in _logged(tmp_path)] == [0, 1, 2] and last["skipped_steps"] == 2
    diverging = _Recorder(losses={step: float("nan") for step in range(2, 100)})
    with pytest.raises(FloatingPointError, match="5 non-finite test losses in a row, the last at step 6"):
        train_loop(diverging, _config(max_steps=20), DistributedContext(), tmp_path / "diverging", 0,
                   StopSignals(), progress=False)


def test_a_skipped_step_drops_its_gradients():
    weight = torch.ones(2, requires_grad=True)
    optimizer, guard = torch.optim.SGD([weight], lr=0.1), NonFiniteGuard(5, "test")
    weight.sum().backward()
    assert finite_everywhere(DistributedContext(), guard, 1.0, 0, [optimizer]) and weight.grad is not None
    assert not finite_everywhere(DistributedContext(), guard, float("nan"), 1, [optimizer])
    assert weight.grad is None and guard.skipped == 1


def test_a_resumed_optimizer_has_its_moments_back_and_the_configs_settings(tmp_path):
    weight = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    before = torch.optim.AdamW([weight], lr=0.1, betas=(0.9, 0.99), weight_decay=0.0)
    weight.sum().backward()
    before.step()
    save_training_state(tmp_path / "last.safetensors", {}, {"opt": before}, step=7)
    now = torch.optim.AdamW([weight], lr=0.1, betas=(0.5, 0.9), weight_decay=0.01)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    assert resume_optimizers(None, {"opt": now}, scaler) == 0
    state = resume_training_state(tmp_path / "last.safetensors", {}, {})
    assert resume_optimizers(state, {"opt": now}, scaler) == 7
    assert torch.equal(now.state[weight]["exp_avg"], before.state[weight]["exp_avg"])
    assert now.param_groups[0]["betas"] == (0.5, 0.9) and now.param_groups[0]["weight_decay"] == 0.01


AGREE = """
import torch
from latent_diffusion.training.distributed import DistributedContext
from latent_diffusion.training.faults import StopSignals
from latent_diffusion.training.loop import Deadline, stop_reason

ctx = DistributedContext.from_env(torch.device("cpu"))
signals, never, past = StopSignals(), Deadline(None), Deadline(1e-9 if ctx.rank == 0 else None)
signals.requested = "SIGTERM" if ctx.rank == 1 else None
first = stop_reason(ctx, signals, never)
signals.requested = None
print(first, stop_reason(ctx, signals, past), stop_reason(ctx, signals, never))
ctx.close()
"""


def test_every_rank_stops_when_one_rank_is_signalled_or_past_the_deadline():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "WORLD_SIZE": "2"}
    ranks = [subprocess.Popen([sys.executable, "-c", AGREE], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outputs = [rank.communicate(timeout=120) for rank in ranks]
    assert all(rank.returncode == 0 for rank in ranks), outputs
    assert [out.split() for out, _ in outputs] == [["signal", "max_minutes", "None"],
                                                   ["SIGTERM", "max_minutes", "None"]]


_FREED = """
import sys, torch
from latent_diffusion.runtime import reuse_freed_memory
def resident_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS"))
if sys.argv[1] == "reuse":
    assert reuse_freed_memory()
before = resident_mib()
block = torch.ones(96 * 2**20 // 4)  # 96 MiB: beyond glibc's largest mmap threshold
del block
print(resident_mib() - before)
"""


@pytest.mark.skipif(libc_function("mallopt") is None, reason="glibc's allocator only")
def test_cpu_training_keeps_freed_memory_for_the_next_tensors(monkeypatch):
    """A large block freed goes back to the system as glibc sets itself (the next step faults it in anew), and
    stays for reuse once the trainers have set the heap (each in a fresh process: the setting is the process's);
    the trainers set it on a CPU."""
    kept = {}
    for mode in ("as-is", "reuse"):
        proc = subprocess.run([sys.executable, "-c", _FREED, mode], capture_output=True, text=True, check=True)
        kept[mode] = float(proc.stdout.strip().splitlines()[-1])
    assert kept["as-is"] < 16 and kept["reuse"] > 80, kept
    calls = []
    monkeypatch.setattr(loop, "reuse_freed_memory", lambda: calls.append(True))
    loop.distributed_context("cpu", TrainConfig())
    assert calls == [True]
