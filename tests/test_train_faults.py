"""Faults: SIGKILL mid-run or mid-checkpoint, a full disk, Ctrl-C, and checkpoints of another run.

Every resumed run must end with exactly (bitwise, one thread on CPU) the adapter of an
uninterrupted run, and no failure may leave the previous checkpoint unusable.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mmadapter import build_model  # noqa: E402
from mmadapter.adapter_file import AdapterFileError, read_adapter  # noqa: E402
from mmadapter.checkpoint import CheckpointWriteError, TrainStateError, find_checkpoint  # noqa: E402
from mmadapter.model import MMAdapter  # noqa: E402
from mmadapter.plot import read_log  # noqa: E402
from mmadapter.train import TrainConfig, train  # noqa: E402
from test_train import instruction_records, make_text_base, one_thread, subprocess_env  # noqa: E402,F401

# A training run in a fresh process that SIGKILLs itself at a chosen point: the N-th call of
# MMAdapter.loss (mid-step) or the N-th state.json write (mid-checkpoint, after the tensors).
KILLED_RUN = r"""
import json, os, signal, sys
import torch
torch.set_num_threads(1)
import mmadapter.checkpoint as checkpoint
from mmadapter import build_model
from mmadapter.model import MMAdapter
from mmadapter.train import TrainConfig, train

args = json.loads(sys.argv[1])

def kill_on_call(owner, name, n):
    original, calls = getattr(owner, name), [0]
    def wrapper(*a, **k):
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*a, **k)
    setattr(owner, name, wrapper)

if args.get("kill_at_loss_call"):
    kill_on_call(MMAdapter, "loss", args["kill_at_loss_call"])
if args.get("kill_at_state_write"):
    kill_on_call(checkpoint, "_write_text", args["kill_at_state_write"])
model = build_model(args["base"], seed=0)
train(model, args["data"], TrainConfig(**args["config"]))
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The base, the data file, and the adapter of an uninterrupted reference run."""
    root = tmp_path_factory.mktemp("faults")
    base = make_text_base(root / "base")
    data = root / "data.json"
    data.write_text(json.dumps(instruction_records(20, 7)))
    torch.set_num_threads(1)
    config = run_config(root / "reference")
    result = train(build_model(str(base), seed=0), str(data), TrainConfig(**config))
    return {"base": str(base), "data": str(data), "reference": read_adapter(result.adapter_path)[1],
            "steps": result.steps, "reference_dir": str(root / "reference")}


def run_config(output_dir: Path, **overrides) -> dict:
    """20 samples, micro-batches of 4, 2 per step: 3 steps per epoch (the last one short), 3 epochs."""
    return {"output_dir": str(output_dir), "epochs": 3, "batch_size": 4, "grad_accum": 2, "lr": 0.05,
            "warmup_epochs": 1.0, "save_every": 2, "keep_last": 2, "progress": False, "plot": False, **overrides}


def run_killed(setup: dict, output_dir: Path, **kill: int) -> None:
    args = {"base": setup["base"], "data": setup["data"], "config": run_config(output_dir), **kill}
    proc = subprocess.run([sys.executable, "-c", KILLED_RUN, json.dumps(args)], capture_output=True, text=True,
                          env=subprocess_env(), timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]


def resume(setup: dict, output_dir: Path, **overrides):
    config = TrainConfig(**run_config(output_dir, resume=True, **overrides))
    return train(build_model(setup["base"], seed=1), setup["data"], config)  # seed 1: the checkpoint must win


def assert_same_adapter(path: Path, reference: dict[str, torch.Tensor]) -> None:
    tensors = read_adapter(path)[1]
    for name, value in reference.items():
        assert torch.equal(tensors[name], value), f"{name} differs by {(tensors[name] - value).abs().max()}"


def test_sigkill_mid_step_then_resume_equals_uninterrupted_run(setup: dict, tmp_path: Path) -> None:
    # Loss calls per epoch: steps of 2, 2 and 1 micro-batches. Call 9 is the second micro-batch of
    # step 5 (mid-accumulation), after the checkpoint of step 4.
    run_killed(setup, tmp_path, kill_at_loss_call=9)
    assert find_checkpoint(tmp_path / "checkpoints").name == "step-00000004"
    assert not (tmp_path / "adapter.safetensors").exists()
    result = resume(setup, tmp_path)
    assert result.steps == setup["steps"] == 9
    assert_same_adapter(result.adapter_path, setup["reference"])
    steps = [r["step"] for r in read_log(tmp_path / "train_log.jsonl")]
    assert steps == list(range(1, 10))  # the killed run's lines after step 4 were replaced, not duplicated


def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(setup: dict, tmp_path: Path) -> None:
    run_killed(setup, tmp_path, kill_at_state_write=2)  # dies inside the checkpoint of step 4
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text().strip() == "step-00000002"
    torn = list(root.glob(".tmp-*"))
    assert len(torn) == 1 and torn[0].name.startswith(".tmp-step-00000004-")
    assert not (root / "step-00000004").exists()
    result = resume(setup, tmp_path)
    assert not list(root.glob(".tmp-*"))  # cleaned up
    assert_same_adapter(result.adapter_path, setup["reference"])


def test_full_disk_during_a_checkpoint_raises_and_keeps_the_previous_one(
        setup: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch

    real_save, calls = safetensors.torch.save_file, []

    def save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 4:  # the second checkpoint's optimizer file: write half of it, then the disk is full
            real_save(tensors, filename, metadata=metadata)
            with open(filename, "r+b") as f:
                f.truncate(os.path.getsize(filename) // 2)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    with pytest.raises(CheckpointWriteError, match=r"No space left on device.*step-00000002 is intact"):
        train(build_model(setup["base"], seed=0), setup["data"], TrainConfig(**run_config(tmp_path)))
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000002"]
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    result = resume(setup, tmp_path)
    assert_same_adapter(result.adapter_path, setup["reference"])


def ctrl_c_at_loss_call(monkeypatch: pytest.MonkeyPatch, at_call: int) -> None:
    """Send SIGINT (Ctrl-C) to this process during the at_call-th MMAdapter.loss call."""
    original, calls = MMAdapter.loss, [0]

    def loss(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == at_call:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MMAdapter, "loss", loss)


def test_ctrl_c_finishes_the_step_checkpoints_and_resumes_exactly(
        setup: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    handler_before = signal.getsignal(signal.SIGINT)
    ctrl_c_at_loss_call(monkeypatch, 7)  # the second micro-batch of step 4
    interrupted = train(build_model(setup["base"], seed=0), setup["data"], TrainConfig(**run_config(tmp_path)))
    assert interrupted.interrupted and interrupted.steps == 4 and interrupted.adapter_path is None
    assert find_checkpoint(tmp_path / "checkpoints").name == "step-00000004"
    assert signal.getsignal(signal.SIGINT) is handler_before  # restored
    monkeypatch.undo()
    result = resume(setup, tmp_path)
    assert not result.interrupted
    assert_same_adapter(result.adapter_path, setup["reference"])


def test_resume_refuses_another_base_or_other_data(setup: dict, tmp_path: Path) -> None:
    train(build_model(setup["base"], seed=0), setup["data"], TrainConfig(**run_config(tmp_path, epochs=1)))
    saved = (tmp_path / "config.json").read_text()
    other_base = make_text_base(tmp_path / "other_base", seed=5)  # same shapes, other weights
    config = TrainConfig(**run_config(tmp_path, epochs=1, resume=True))
    with pytest.raises(AdapterFileError, match="fingerprint"):
        train(build_model(str(other_base), seed=0), setup["data"], config)
    with pytest.raises(TrainStateError, match="data"):
        train(build_model(setup["base"], seed=0), instruction_records(20, 8), config)
    with pytest.raises(TrainStateError, match="grad_accum"):
        train(build_model(setup["base"], seed=0), setup["data"],
              TrainConfig(**run_config(tmp_path, epochs=1, resume=True, grad_accum=1)))
    assert (tmp_path / "config.json").read_text() == saved  # a refused resume leaves the run as it was
    from mmadapter.data.records import DataError

    with pytest.raises(DataError, match="not found"):  # a failed start writes nothing
        train(build_model(setup["base"], seed=0), str(tmp_path / "missing.json"),
              TrainConfig(**run_config(tmp_path / "new")))
    assert not (tmp_path / "new").exists()


def test_cli_resume_takes_the_runs_own_settings(setup: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's `train --output-dir runs/x --data a.json --resume` after Ctrl-C: the run's own settings
    (from its config.json) continue it exactly; a flag that would change the run is refused, changing nothing."""
    from mmadapter.cli import main

    out = tmp_path / "run"
    ctrl_c_at_loss_call(monkeypatch, 7)  # the second micro-batch of step 4
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in run_config(out).items() if not isinstance(v, bool)]
    assert main(["train", "--base", setup["base"], "--data", setup["data"], *flags, "--no-progress",
                 "--no-plot"]) == 130
    monkeypatch.undo()
    saved = (out / "config.json").read_text()
    assert main(["train", "--output-dir", str(out), "--resume", "--lr", "0.01", "--epochs", "5"]) == 2
    assert (out / "config.json").read_text() == saved
    assert main(["train", "--output-dir", str(out), "--data", setup["data"], "--resume", "--save-every", "3"]) == 0
    assert_same_adapter(out / "adapter.safetensors", setup["reference"])


def test_python_runs_config_json_repeats_them_from_the_cli(setup: dict, tmp_path: Path) -> None:
    from mmadapter.cli import main

    recorded = json.loads((Path(setup["reference_dir"]) / "config.json").read_text())
    assert recorded["base"] == setup["base"] and recorded["data"] == setup["data"]
    assert (recorded["n_prompts"], recorded["gate"], recorded["dtype"]) == (10, "per-head", "float32")
    assert main(["train", "--config", str(Path(setup["reference_dir"]) / "config.json"),
                 "--output-dir", str(tmp_path)]) == 0
    assert_same_adapter(tmp_path / "adapter.safetensors", setup["reference"])


def test_accumulation_is_capped_by_the_micro_batches_of_an_epoch(setup: dict, tmp_path: Path) -> None:
    """grad_accum 8 over 2 micro-batches of 4: steps of 8 samples, and the learning rate scaled to 8."""
    config = TrainConfig(output_dir=str(tmp_path), epochs=1, batch_size=4, grad_accum=8, save_every=0,
                         progress=False, plot=False)
    result = train(build_model(setup["base"], seed=0), instruction_records(8, 1), config)
    assert result.steps == 1 and result.summary["effective_batch"] == 8
    assert result.summary["peak_lr"] == pytest.approx(9e-3 * 8 / 256)


def poison_loss(monkeypatch: pytest.MonkeyPatch, at_call: int) -> None:
    """Make the at_call-th MMAdapter.loss call return NaN (as an fp overflow in a bad batch would)."""
    original, calls = MMAdapter.loss, [0]

    def loss(self, *args, **kwargs):
        calls[0] += 1
        value = original(self, *args, **kwargs)
        return value * float("nan") if calls[0] == at_call else value

    monkeypatch.setattr(MMAdapter, "loss", loss)


def test_nan_loss_stops_with_a_good_checkpoint_and_names_the_batch(setup: dict, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from mmadapter.train import NonFiniteLossError

    poison_loss(monkeypatch, at_call=7)  # step 4: after the checkpoint of step 2
    config = run_config(tmp_path / "run")
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss nan.*step 4.*samples .*resume") as info:
        train(build_model(setup["base"], seed=0), setup["data"], TrainConfig(**config))
    print(f"\nNaN loss reported: {info.value}")
    latest = find_checkpoint(tmp_path / "run" / "checkpoints")
    assert latest is not None and latest.name == "step-00000003"  # the state just before the bad batch
    tensors = read_adapter(latest / "adapter.safetensors")[1]
    assert all(torch.isfinite(t).all() for t in tensors.values())
    bad = [r for r in read_log(tmp_path / "run" / "train_log.jsonl") if r["type"] == "nonfinite"]
    assert len(bad) == 1 and bad[0]["samples"] and bad[0]["step"] == 4  # the step the message names

    monkeypatch.undo()  # resuming skips nothing now: the run ends like the uninterrupted one
    result = train(build_model(setup["base"], seed=0), setup["data"], TrainConfig(**{**config, "resume": True}))
    final = read_adapter(result.adapter_path)[1]
    assert all(torch.equal(final[k], setup["reference"][k]) for k in final)


def test_nan_loss_can_skip_the_batch(setup: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    poison_loss(monkeypatch, at_call=3)
    result = train(build_model(setup["base"], seed=0), setup["data"],
                   TrainConfig(**run_config(tmp_path / "run", on_nonfinite="skip")))
    assert result.steps == setup["steps"] - 1  # one optimizer step skipped, the run completed
    final = read_adapter(result.adapter_path)[1]
    assert all(torch.isfinite(t).all() for t in final.values())
    log = read_log(tmp_path / "run" / "train_log.jsonl")
    assert [r["action"] for r in log if r["type"] == "nonfinite"] == ["skip"]
