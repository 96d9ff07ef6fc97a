"""Training state on disk: written atomically, resumed exactly.

A checkpoint is one directory `checkpoints/step-00000120/` holding
  adapter.safetensors    the adapter file (adapter_file.save_adapter, with a training summary)
  optimizer.safetensors  optimizer state tensors ("state.<param name>.<key>") and RNG states ("rng.*")
  state.json             step, epoch and batch position, config, optimizer hyper-parameters, the
                         Python RNG state, fingerprints of the base and the data (JSON, never pickles)
It is written into `checkpoints/.tmp-step-...`, every file fsynced, then renamed into place and the
`latest` pointer file replaced atomically, so a crash, a kill or a full disk at any moment leaves
the previous checkpoint (and `latest` naming a complete one) untouched. Older ones are pruned.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .adapter_file import AdapterFileError, check_base, read_adapter, save_adapter
from .atomic import _fsync_dir, atomic_write_text

if TYPE_CHECKING:
    from .model import MMAdapter

FORMAT = "mmadapter-train-state"
VERSION = 1
LATEST = "latest"
ADAPTER_FILE = "adapter.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
_STEP_DIR = re.compile(r"step-(\d+)")


class TrainStateError(ValueError):
    """A checkpoint that cannot be resumed here; the message says why and what to do."""


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed; the previous checkpoint is intact."""


@dataclass
class TrainState:
    """What a checkpoint restores besides the adapter tensors."""

    step: int  # optimizer steps done
    epoch: int  # the epoch in progress
    batch: int  # next global micro-batch of that epoch
    info: dict[str, Any]  # config, fingerprints, timing: free-form JSON
    path: Path | None = None


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


# ----------------------------------------------------------------------------------------------
# Writing


def save_checkpoint(root: str | os.PathLike, state: TrainState, model: MMAdapter, optimizer: torch.optim.Optimizer,
                    param_names: Mapping[torch.nn.Parameter, str], training_summary: dict[str, Any],
                    keep_last: int = 2) -> Path:
    """Write one checkpoint atomically, point `latest` at it, prune all but the newest keep_last."""
    root = Path(root)
    name = checkpoint_name(state.step)
    previous = _read_pointer(root)

    def write(folder: Path) -> None:
        save_adapter(model, folder / ADAPTER_FILE, training=training_summary)
        tensors, groups = _optimizer_tensors(optimizer, param_names)
        tensors.update(_rng_tensors())
        _write_safetensors(folder / OPTIMIZER_FILE, tensors)
        body = {"format": FORMAT, "version": VERSION, "step": state.step, "epoch": state.epoch,
                "batch": state.batch, "optimizer_groups": groups, "python_rng": _python_rng(), **state.info}
        _write_text(folder / STATE_FILE, json.dumps(body, indent=1))

    try:
        final = _publish_directory(root, name, write)
        atomic_write_text(root / LATEST, name + "\n")
    except Exception as e:
        where = f"the previous checkpoint {root / previous} is intact" if previous else "no earlier checkpoint exists"
        raise CheckpointWriteError(
            f"could not write checkpoint {root / name} ({type(e).__name__}: {e}); {where}. "
            "Free disk space or fix the error, then resume with --resume (resume=True)") from e
    prune(root, keep_last, keep=name)
    return final


def _publish_directory(root: Path, name: str, write: Callable[[Path], None]) -> Path:
    """write(tmp) into a temporary directory, fsync it, rename it to root/name (replacing an older copy)."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        _fsync_dir(tmp)
        final = root / name
        if final.exists():  # the same step written before a crash: swap the new copy in
            stale = root / f".tmp-old-{name}-{os.getpid()}"
            os.replace(final, stale)
            os.replace(tmp, final)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
        return final
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def prune(root: Path, keep_last: int, keep: str | None = None) -> None:
    """Delete all but the newest keep_last checkpoints (never `keep`, the one `latest` names)."""
    steps = sorted(_complete_checkpoints(root), key=lambda p: _step_of(p.name))
    for folder in steps[:max(len(steps) - max(keep_last, 1), 0)]:
        if folder.name != keep:
            shutil.rmtree(folder, ignore_errors=True)


def remove_stale_temporaries(root: str | os.PathLike) -> list[Path]:
    """Temporary directories left by a crash mid-write (never complete checkpoints)."""
    root = Path(root)
    stale = sorted(root.glob(".tmp-*")) if root.is_dir() else []
    for folder in stale:
        shutil.rmtree(folder, ignore_errors=True)
    return stale


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path))
    _fsync_file(path)


def _write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")
    _fsync_file(path)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _optimizer_tensors(optimizer: torch.optim.Optimizer, param_names: Mapping[torch.nn.Parameter, str]
                       ) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Optimizer state keyed by parameter name (not position), and the JSON-able group settings."""
    tensors: dict[str, torch.Tensor] = {}
    groups = []
    for group in optimizer.param_groups:
        names = [param_names[p] for p in group["params"]]
        settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items() if k != "params"}
        groups.append({"params": names, **settings})
        for p, name in zip(group["params"], names):
            for key, value in optimizer.state.get(p, {}).items():
                value = value if torch.is_tensor(value) else torch.tensor(value)
                tensors[f"state.{name}.{key}"] = value.detach().to("cpu").contiguous()
    return tensors, groups


def _rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    tensors["rng.numpy_extra"] = torch.tensor([pos, has_gauss], dtype=torch.int64)
    tensors["rng.numpy_gauss"] = torch.tensor(gauss, dtype=torch.float64)
    return tensors


def _python_rng() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


# ----------------------------------------------------------------------------------------------
# Reading


def find_checkpoint(root: str | os.PathLike) -> Path | None:
    """The checkpoint `latest` names, else the newest complete one, else None."""
    root = Path(root)
    pointed = _read_pointer(root)
    if pointed and (root / pointed / STATE_FILE).is_file():
        return root / pointed
    complete = sorted(_complete_checkpoints(root), key=lambda p: _step_of(p.name))
    return complete[-1] if complete else None


def load_train_state(folder: str | os.PathLike, model: MMAdapter, optimizer: torch.optim.Optimizer,
                     param_names: Mapping[torch.nn.Parameter, str], allow_base_mismatch: bool = False) -> TrainState:
    """Restore adapter tensors, optimizer state and RNG states in place; return the position."""
    folder = Path(folder)
    try:
        body = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise TrainStateError(f"{folder}: cannot read {STATE_FILE} ({e}); delete this checkpoint directory "
                              "or start without resume") from e
    if body.get("format") != FORMAT or int(body.get("version", 0)) > VERSION:
        raise TrainStateError(f"{folder}: not an mmadapter training checkpoint of a version this release reads "
                              f"(format {body.get('format')!r}, version {body.get('version')!r})")
    try:
        meta, adapter_tensors = read_adapter(folder / ADAPTER_FILE)
    except AdapterFileError as e:
        raise TrainStateError(f"cannot resume: {e}") from e
    check_base(meta, model, str(folder / ADAPTER_FILE), allow_base_mismatch)
    _load_adapter_tensors(model, adapter_tensors, folder)
    tensors = _read_safetensors(folder / OPTIMIZER_FILE)
    _load_optimizer(optimizer, param_names, body["optimizer_groups"], tensors, folder)
    _restore_rng(tensors, body["python_rng"])
    info = {k: v for k, v in body.items() if k not in ("format", "version", "step", "epoch", "batch",
                                                       "optimizer_groups", "python_rng")}
    return TrainState(step=int(body["step"]), epoch=int(body["epoch"]), batch=int(body["batch"]), info=info,
                      path=folder)


def _load_adapter_tensors(model: MMAdapter, tensors: dict[str, torch.Tensor], folder: Path) -> None:
    adapter = model.adapter
    expected = {k: tuple(v.shape) for k, v in adapter.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if expected != got:
        raise TrainStateError(f"{folder}: the checkpoint's adapter {got} differs from this model's adapter "
                              f"{expected}; build the model with the adapter (and vision) settings of that run")
    with torch.no_grad():
        for name, value in adapter.state_dict().items():
            value.copy_(tensors[name])


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:
        raise TrainStateError(f"{path}: cannot read ({type(e).__name__}: {e}); the checkpoint is damaged, "
                              "delete it to resume from an earlier one") from e


def _load_optimizer(optimizer: torch.optim.Optimizer, param_names: Mapping[torch.nn.Parameter, str],
                    groups: list[dict[str, Any]], tensors: dict[str, torch.Tensor], folder: Path) -> None:
    index = {name: i for i, name in enumerate(param_names[p] for g in optimizer.param_groups for p in g["params"])}
    saved = [name for g in groups for name in g["params"]]
    if sorted(saved) != sorted(index) or len(groups) != len(optimizer.param_groups):
        raise TrainStateError(f"{folder}: the optimizer state holds parameters {saved} but this run trains "
                              f"{list(index)}; resume with the same adapter settings")
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            name, _, field = key[len("state."):].rpartition(".")
            state.setdefault(index[name], {})[field] = value
    param_groups = []
    for g in groups:
        settings = {k: (tuple(v) if k == "betas" else v) for k, v in g.items() if k != "params"}
        param_groups.append({**settings, "params": [index[name] for name in g["params"]]})
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


def _restore_rng(tensors: dict[str, torch.Tensor], python_rng: list[Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])
    pos, has_gauss = (int(x) for x in tensors["rng.numpy_extra"])
    np.random.set_state(("MT19937", tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss,
                         float(tensors["rng.numpy_gauss"])))
    version, internal, gauss = python_rng
    random.setstate((version, tuple(internal), gauss))


def _read_pointer(root: Path) -> str | None:
    try:
        name = (root / LATEST).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return name if _STEP_DIR.fullmatch(name) else None


def _complete_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.fullmatch(p.name) and (p / STATE_FILE).is_file()]


def _step_of(name: str) -> int:
    return int(_STEP_DIR.fullmatch(name).group(1))
