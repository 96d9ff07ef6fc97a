"""What a training run records and tells. Every process keeps the records; only the main process
writes or prints.

Outputs in output_dir: config.json (effective options, with the model options that rebuild the model:
`train --config` repeats the run), train_log.jsonl (one line per step: loss, lr, grad_norm,
tokens/s...; one per eval), checkpoints/ (checkpoint.py; `resume=True` continues from `latest`,
ending bitwise where an uninterrupted CPU run ends), adapter.safetensors (with a training summary in
its metadata), summary.json (what was trained on and skipped) and loss_curve.png.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from .atomic import atomic_write_text
from .plot import read_log
from .train_data import format_data_summary

if TYPE_CHECKING:
    from .model import MMAdapter

LOG_FILE, ADAPTER_FILE, CONFIG_FILE, SUMMARY_FILE, PLOT_FILE = (
    "train_log.jsonl", "adapter.safetensors", "config.json", "summary.json", "loss_curve.png")


@dataclass
class TrainResult:
    output_dir: Path
    adapter_path: Path | None  # None when the run was interrupted (the checkpoint holds the adapter)
    steps: int
    epochs: float
    final_loss: float | None
    eval_losses: list[float]  # before training (when started fresh) and after every epoch
    interrupted: bool
    summary: dict[str, Any]


class RunLog:
    """The records of a run (in memory on every process) and their JSONL file in `out` (main process)."""

    def __init__(self, out: Path, main: bool) -> None:
        self.path, self.main = out / LOG_FILE, main
        self.records: list[dict[str, Any]] = []

    @property
    def eval_losses(self) -> list[float]:
        """Eval losses in order: before training (when started fresh) and after every epoch."""
        return [r["eval_loss"] for r in self.records if r.get("type") == "eval"]

    def last_train(self) -> dict[str, Any] | None:
        return next((r for r in reversed(self.records) if r.get("type") == "train"), None)

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self.main:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def say(self, text: str) -> None:
        if self.main:
            tqdm.write(text, file=sys.stderr)

    def start_fresh(self) -> None:
        self.records = []
        if self.main:
            self.path.unlink(missing_ok=True)

    def trim(self, step: int, epoch: int) -> None:
        """Forget lines a killed run wrote after its last checkpoint (step, epoch): they are about to be redone."""
        kept = []
        if self.path.is_file():
            kept = [r for r in read_log(self.path) if (r.get("type") == "train" and r["step"] <= step)
                    or (r.get("type") == "eval" and r["epoch"] <= epoch)]
        self.records = kept
        if self.main:
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))


def format_run_summary(s: Mapping[str, Any], adapter_path: Path | None, out: Path) -> str:
    lines = [("interrupted" if s["interrupted"] else "finished") +
             f" after {s['steps']} steps ({s['epochs']} epochs) in {s['elapsed_s']:.1f} s; "
             f"final loss {s['final_loss']}" + (f", eval loss {s['eval_losses'][-1]:.4f}" if s["eval_losses"] else "")]
    lines.append(format_data_summary("train", s["train_data"]))
    if "feature_cache" in s:
        lines.append(f"image features: {s['feature_cache']}")
    if "prefix_cache" in s:
        lines.append(f"prefix cache: {s['prefix_cache']}")
    lines.append(f"adapter: {adapter_path}" if adapter_path else
                 f"checkpoint: {s['checkpoint']} (continue with --resume / resume=True)")
    lines.append(f"logs: {out / LOG_FILE}, summary: {out / SUMMARY_FILE}")
    return "\n".join(lines)


def model_options(model: MMAdapter) -> dict[str, Any]:
    """The CLI's model options (`mmadapter train --help`, group "model") that rebuild `model`, so a
    run started from Python records them in config.json and `train --config` repeats it."""
    options: dict[str, Any] = {"base": model.base_source,
                               "dtype": str(model.base.tok_embeddings.weight.dtype).removeprefix("torch.")}
    if model.adapter is not None:
        a = model.adapter.config
        options.update(n_prompts=a.n_prompts, n_layers=a.n_layers, gate=a.gate)
    vision = getattr(model.vision, "config", None)
    if vision is not None and model.adapter is not None and model.adapter.projector is not None:
        options.update(vision=vision.spec, vision_scales=vision.n_scales, projector_hidden=vision.projector_hidden)
        if vision.projector == "spatial":
            options.update(projector="spatial", spatial_grid=vision.spatial_grid, token_depth=vision.token_depth)
    return options
