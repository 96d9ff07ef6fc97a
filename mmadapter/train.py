"""Instruction tuning of the adapter: text-only and multimodal, resumable, distributed.

    from mmadapter import build_model
    from mmadapter.train import TrainConfig, train
    model = build_model("smollm2-135m-instruct")
    result = train(model, "alpaca.json", TrainConfig(epochs=3, output_dir="runs/alpaca"))

The CLI (`mmadapter train`) is generated from `TrainConfig`'s fields, so both take the same options.

Recipe (LLaMA-Adapter V1, alpaca_finetuning_v1/finetuning.py): AdamW betas (0.9, 0.95), weight decay
0.02, lr = blr 9e-3 x effective batch / 256 when lr is not given, 5 epochs, linear warm-up over 2
epochs then a half-cycle cosine to min_lr, set before every optimizer step from the fractional epoch
(the reference's adjust_learning_rate). Weight decay applies to the prompts and the projector's
weight matrices; not to biases and not to the gates: a gate is a per-head scale (like a norm's
gain) whose zero start *is* the method, and decaying it only pulls the model back to the base
(the reference decays its gates only because they are stored as [1, H, 1, 1] tensors).

Exactness: the loss of an optimizer step is the sum of token losses over every response token of
the whole effective batch (batch_size x grad_accum x processes) divided by their number, known
before the step starts, so accumulation and distribution change nothing but float rounding.
Batches come from a length-grouped sampler over *global* micro-batches of batch_size x processes
samples; process r takes every world-th sample of each, so N processes with batch_size B train
exactly like one process with batch_size N x B. Gradients of the ~1M adapter parameters are summed
with one all-reduce per optimizer step (not DistributedDataParallel: the base is frozen and needs no
wrapper, the sum must not be averaged by the world size, and one flat all-reduce per step is all the
communication there is). Only rank 0 writes files.

Outputs in output_dir: config.json (effective options), train_log.jsonl (one line per step: loss, lr,
grad_norm, tokens/s...; one per eval), checkpoints/ (checkpoint.py; `resume=True` continues from
`latest`, ending bitwise where an uninterrupted CPU run ends), adapter.safetensors (with a training
summary in its metadata), summary.json (what was trained on and skipped) and loss_curve.png.
Ctrl-C or SIGTERM finishes the current step, writes a checkpoint and returns (interrupted=True).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
import typing
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .atomic import atomic_write_text
from .checkpoint import (CheckpointWriteError, TrainState, TrainStateError, checkpoint_name, find_checkpoint,
                         load_checkpoint, remove_stale_temporaries, save_checkpoint)
from .data.encode import LengthGroupedBatchSampler, collate
from .distributed import Distributed
from .prefix_cache import MODES as PREFIX_CACHE_MODES
from .prefix_cache import PrefixCache, gather_prefix
from .train_data import PreparedData, format_data_summary, prepare_data

if TYPE_CHECKING:
    from .model import MMAdapter

LOG_FILE, ADAPTER_FILE, CONFIG_FILE, SUMMARY_FILE, PLOT_FILE = (
    "train_log.jsonl", "adapter.safetensors", "config.json", "summary.json", "loss_curve.png")


def _opt(default: Any, help: str, **metadata: Any) -> Any:
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class TrainConfig:
    """Every training option; `mmadapter train --help` lists the same fields as flags."""

    # data
    data: str | None = _opt(None, "training data: a .json/.jsonl file (Alpaca, question/answer or LLaVA "
                                  "conversations; optional \"image\" paths) or scienceqa:<dir>")
    eval_data: str | None = _opt(None, "held-out data (same forms); its loss is logged after every epoch")
    image_root: str | None = _opt(None, "folder that relative image paths start from (default: the data file's)")
    template: str | None = _opt(None, "prompt template: alpaca, chat or plain (default: the model's)")
    max_seq_len: int = _opt(512, "longer samples are truncated (and counted)")
    scienceqa_format: str = _opt("QCM-A", "ScienceQA prompt format: QCM-A, QCM-ALE, CQM-A, CQM-ALE")
    scienceqa_split: str = _opt("train", "ScienceQA split used for training")
    scienceqa_eval_split: str = _opt("val", "ScienceQA split used for eval_data")
    # optimisation
    epochs: int = _opt(5, "passes over the training data")
    batch_size: int = _opt(4, "samples per micro-batch on each process")
    grad_accum: int = _opt(1, "micro-batches per optimizer step")
    lr: float | None = _opt(None, "peak learning rate (default: blr x effective batch / 256)")
    blr: float = _opt(9e-3, "base learning rate for an effective batch of 256")
    min_lr: float = _opt(0.0, "learning rate at the end of the cosine")
    warmup_epochs: float = _opt(2.0, "linear warm-up length in (fractional) epochs")
    weight_decay: float = _opt(0.02, "AdamW weight decay of prompts and projector weights (not gates, biases)")
    beta1: float = _opt(0.9, "AdamW beta1")
    beta2: float = _opt(0.95, "AdamW beta2")
    clip_grad: float | None = _opt(None, "clip the gradient norm to this value (default: no clipping)")
    on_nonfinite: str = _opt("stop", "a NaN/inf loss or gradient: stop (with a checkpoint of the state before "
                                     "that batch) or skip the batch", choices=("stop", "skip"))
    seed: int = _opt(0, "seed of the adapter initialisation and the batch order")
    fsdp: bool = _opt(False, "under torchrun: shard the frozen layers across processes (FSDP) instead of a "
                             "whole base per process, for bases too big for one device")
    precision: str = _opt("auto", "auto: bf16 autocast on GPU, fp32 on CPU; or fp32 / bf16",
                          choices=("auto", "fp32", "bf16"))
    group_by_length: bool = _opt(True, "batch samples of similar length together (less padding)")
    # efficiency
    prefix_cache: str = _opt("off", "cache the frozen layers' output per sample: off, memory or disk",
                             choices=PREFIX_CACHE_MODES)
    prefix_cache_mb: float = _opt(2048.0, "size bound of the prefix cache in MB (beyond it: recomputed)")
    prefix_cache_dir: str | None = _opt(None, "directory of the disk prefix cache (default: <output_dir>/prefix_cache)")
    feature_cache_dir: str | None = _opt(None, "keep image features on disk here (reused by later runs)")
    feature_batch_size: int = _opt(32, "images per vision-tower batch when precomputing features")
    # outputs
    output_dir: str = _opt("runs/adapter", "adapter, logs, plot and checkpoints go here")
    save_every: int = _opt(200, "write a checkpoint every N optimizer steps (0: only at the end)")
    keep_last: int = _opt(2, "checkpoints kept on disk")
    resume: bool = _opt(False, "continue from the latest checkpoint in output_dir (fresh start if none)")
    allow_base_mismatch: bool = _opt(False, "resume a checkpoint whose base fingerprint differs")
    progress: bool = _opt(True, "show progress bars")
    plot: bool = _opt(True, "draw loss_curve.png at the end")

    def __post_init__(self) -> None:
        positive = ("max_seq_len", "epochs", "batch_size", "grad_accum", "feature_batch_size", "keep_last")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)} must be at least 1")
        for name in ("save_every", "blr", "min_lr", "warmup_epochs", "weight_decay", "prefix_cache_mb"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)} must be >= 0")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"TrainConfig.lr={self.lr} must be positive (or None for blr scaling)")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ValueError(f"TrainConfig.clip_grad={self.clip_grad} must be positive (or None: no clipping)")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"TrainConfig.{f.name}={getattr(self, f.name)!r}: choose one of {', '.join(choices)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """Build from a config file's mapping; unknown keys and wrong types are errors that name them."""
        return cls(**coerce_fields(cls, values))


def coerce_fields(cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """Check a mapping against a dataclass's fields: known names, matching types (int accepted as float)."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    out = {}
    for name, value in values.items():
        kind, optional = field_type(hints[name])
        if value is None and optional:
            out[name] = None
        elif kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
        elif isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
            out[name] = value
        else:
            raise ValueError(f"{cls.__name__}.{name}: expected {kind.__name__}{' or null' if optional else ''}, "
                             f"got {value!r}")
    return out


def field_type(hint: Any) -> tuple[type, bool]:
    """(base type, optional?) of a field annotation such as `float | None`."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if args:
        return args[0], len(args) < len(typing.get_args(hint))
    return hint, False


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A flat mapping of options from a .json or .yaml/.yml file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text)
        else:
            values = json.loads(text)
    except Exception as e:
        raise ValueError(f"{path}: cannot parse the config ({e})") from e
    if not isinstance(values, dict):
        raise ValueError(f"{path}: a config file holds one mapping of option names to values")
    return values


class NonFiniteLossError(RuntimeError):
    """Training met a NaN/inf loss or gradient; the message names the batch and the checkpoint to resume."""


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


# ----------------------------------------------------------------------------------------------
# The loop


class Trainer:
    """One training run; `train()` is the entry point. Holds the state that checkpoints capture."""

    def __init__(self, model: MMAdapter, config: TrainConfig, extra_config: Mapping[str, Any] | None = None) -> None:
        self.model, self.config = model, config
        self.extra_config = dict(extra_config or {})
        if model.tokenizer is None:
            raise ValueError("this base has no tokenizer, which training needs to encode text; "
                             "load a base with tokenizer files (tokenizer.json / tokenizer.model / GGUF)")
        if model.adapter is None:
            model.add_adapter(seed=config.seed)
        self.device = model.device
        self.dist = Distributed.setup(self.device)
        self.sharded = config.fsdp and self.dist.world > 1
        if self.sharded:
            if config.prefix_cache != "off":
                raise ValueError("--fsdp and --prefix-cache cannot be combined: cache hits differ between "
                                 "processes, while sharded layers need every process in every layer")
            self.dist.shard_layers(model.base.layers, self.device)
        self.out = Path(config.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        self.template = config.template or model.template_for()
        self.prefix_cache: PrefixCache | None = None
        self.image_features: dict[str, Tensor | None] = {}  # by image key, shared by train and eval data
        self.stop_requested = False
        self.accum = config.grad_accum  # micro-batches per step; fewer when an epoch has fewer (set in _run)
        self.step = 0
        self.saved_step: int | None = None  # step of the last checkpoint written or resumed
        self.records: list[dict[str, Any]] = []
        self.eval_losses: list[float] = []

    # -- set-up --------------------------------------------------------------------------------

    def setup(self) -> None:
        """Freeze the base, make the adapter fp32 and trainable, build the optimizer (decay groups)."""
        model = self.model
        model.freeze()
        adapter = model.adapter
        if any(p.dtype != torch.float32 for p in adapter.parameters()):
            adapter.float()  # trainable parameters (and so the optimizer state) are always fp32
        adapter.train()
        named = [(n, p) for n, p in adapter.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        self.param_names = {p: n for n, p in named}
        decay = [p for n, p in named if p.ndim >= 2 and n != "gates"]
        no_decay = [p for n, p in named if not (p.ndim >= 2 and n != "gates")]
        c = self.config
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": c.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=0.0, betas=(c.beta1, c.beta2))
        for p in self.params:  # every process starts from rank 0's adapter
            self.dist.broadcast(p.data)

    def _autocast(self) -> Any:
        p = self.config.precision
        if p == "bf16" or (p == "auto" and self.device.type == "cuda"):
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def prepare(self, source: Any, eval_split: bool = False) -> PreparedData:
        """Read and encode a data source; image features are computed here, once per unique image."""
        return prepare_data(self.model, source, self.config, self.template, self.dist, eval_split,
                            known_images=self.image_features)

    # -- forward -------------------------------------------------------------------------------

    def batch_loss(self, data: PreparedData, indices: list[int], images: bool = True) -> Tensor:
        """Summed token cross-entropy of some samples (a micro-batch share)."""
        model = self.model
        batch = collate([data.samples[i] for i in indices], pad_id=model.tokenizer.pad_id)
        tokens, labels = batch["tokens"].to(self.device), batch["labels"].to(self.device)
        features, has_image = None, None
        rows = torch.tensor([data.image_rows[i] for i in indices], device=self.device)
        if images and bool((rows >= 0).any()):
            has_image = rows >= 0
            features = data.features.new_zeros(len(indices), data.features.shape[1])
            features[has_image] = data.features[rows[has_image]]
        with self._autocast():
            prefix = None
            if self.prefix_cache is not None:
                keys = [self.prefix_cache.key(data.samples[i].tokens) for i in indices]
                prefix = gather_prefix(self.prefix_cache, model.frozen_prefix, tokens,
                                       batch["lengths"].tolist(), keys)
            return model.loss(tokens, labels, features, has_image, prefix=prefix, reduction="sum")

    @torch.no_grad()
    def evaluate(self, data: PreparedData) -> float:
        """Mean loss per response token over the whole set (processes split the batches)."""
        self.model.adapter.eval()
        order = sorted(range(len(data.samples)), key=lambda i: -len(data.samples[i]))
        bs = self.config.batch_size
        batches = [order[i:i + bs] for i in range(0, len(order), bs)]
        total = torch.zeros(2, dtype=torch.float64)
        mine = batches[self.dist.rank::self.dist.world]
        for indices in mine:
            total[0] += float(self.batch_loss(data, indices))
            total[1] += sum(data.label_counts[i] for i in indices)
        if self.sharded:
            for _ in range(-(-len(batches) // self.dist.world) - len(mine)):
                self.batch_loss(data, batches[0][:1], images=False)  # see `_idle_pass`
        total = self.dist.all_reduce(total)
        self.model.adapter.train()
        return float(total[0] / total[1])

    def _idle_pass(self, data: PreparedData, indices: list[int]) -> None:
        """Under FSDP every process must join every layer's weight gathering: one without a share of a
        micro-batch runs a sample with zero weight (text only, so an unused projector stays unused)."""
        (self.batch_loss(data, indices, images=False) * 0.0).backward()

    def _reduce_gradients(self, loss_sum: Tensor) -> Tensor:
        """Sum gradients (and the loss) over processes with one flat all-reduce.

        A parameter that no process used this step (the projector in a step without images) keeps
        grad None, so the optimizer skips it exactly as a single process would.
        """
        if self.dist.world == 1:
            return loss_sum
        parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in self.params]
        used = torch.tensor([float(p.grad is not None) for p in self.params], device=self.device)
        flat = self.dist.all_reduce(torch.cat([*parts, used, loss_sum.reshape(1).float().to(self.device)]))
        offset = 0
        for i, p in enumerate(self.params):
            grad = flat[offset:offset + p.numel()].view_as(p).to(p.dtype)
            p.grad = grad.clone() if flat[-1 - len(self.params) + i] > 0 else None
            offset += p.numel()
        return flat[-1]

    def train_step(self, data: PreparedData, group: list[list[int]]) -> tuple[float, float]:
        """One optimizer step over global micro-batches; returns (mean loss, gradient norm).

        A non-finite loss or gradient leaves the adapter and the optimizer untouched and returns it.
        """
        n_labels = sum(data.label_counts[i] for batch in group for i in batch)
        loss_sum = torch.zeros((), device=self.device)
        for batch in group:
            mine = batch[self.dist.rank::self.dist.world]
            if not mine:
                if self.sharded:
                    self._idle_pass(data, batch[:1])
                continue
            loss = self.batch_loss(data, mine)
            (loss / n_labels).backward()
            loss_sum += loss.detach().float()
        loss_sum = self._reduce_gradients(loss_sum)
        if self.config.clip_grad:
            norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.config.clip_grad))
        else:
            norm = math.sqrt(sum(float(p.grad.float().square().sum()) for p in self.params if p.grad is not None))
        loss = float(loss_sum) / n_labels
        if math.isfinite(loss) and math.isfinite(norm):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, norm

    # -- schedule ------------------------------------------------------------------------------

    def peak_lr(self) -> float:
        return self.config.lr or self.config.blr * self.effective_batch / 256

    @property
    def effective_batch(self) -> int:
        """Samples per optimizer step: accumulation is capped by the micro-batches an epoch has."""
        return self.config.batch_size * self.accum * self.dist.world

    def learning_rate(self, epoch: float) -> float:
        """Linear warm-up, then half-cycle cosine to min_lr; `epoch` is fractional (reference schedule)."""
        c, peak = self.config, self.peak_lr()
        if epoch < c.warmup_epochs:
            return peak * epoch / c.warmup_epochs
        span = c.epochs - c.warmup_epochs
        if span <= 0:
            return peak
        return c.min_lr + (peak - c.min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - c.warmup_epochs) / span))

    # -- outputs -------------------------------------------------------------------------------

    def _log(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self.dist.main:
            with open(self.out / LOG_FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def _say(self, text: str) -> None:
        if self.dist.main:
            tqdm.write(text, file=sys.stderr)

    def _trim_log(self, state: TrainState) -> None:
        """Forget log lines a killed run wrote after its last checkpoint (they are about to be redone)."""
        from .plot import read_log

        path = self.out / LOG_FILE
        kept = []
        if path.is_file():
            kept = [r for r in read_log(path) if (r.get("type") == "train" and r["step"] <= state.step)
                    or (r.get("type") == "eval" and r["epoch"] <= state.epoch)]
        self.records = kept
        self.eval_losses = [r["eval_loss"] for r in kept if r.get("type") == "eval"]
        if self.dist.main:
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))

    def _training_summary(self, data: PreparedData, epochs_done: float, completed: bool) -> dict[str, Any]:
        last = next((r for r in reversed(self.records) if r.get("type") == "train"), None)
        return {"steps": self.step, "epochs": round(epochs_done, 4), "completed": completed,
                "final_loss": last["loss"] if last else None,
                "eval_loss": self.eval_losses[-1] if self.eval_losses else None,
                "effective_batch": self.effective_batch, "peak_lr": self.peak_lr(), "template": self.template,
                "max_seq_len": self.config.max_seq_len, "data": data.summary["source"],
                "samples": data.summary["samples"], "processes": self.dist.world}

    def _checkpoint(self, data: PreparedData, epoch: int, batch: int, n_batches: int) -> None:
        """Rank 0 writes; every process learns whether it worked (none hangs on a failed write)."""
        error: Exception | None = None
        if self.dist.main:
            state = TrainState(step=self.step, epoch=epoch, batch=batch, info=self._state_info(data))
            summary = self._training_summary(data, epoch + batch / n_batches, completed=False)
            try:
                save_checkpoint(self.ckpt_root, state, self.model, self.optimizer, self.param_names, summary,
                                keep_last=self.config.keep_last)
            except CheckpointWriteError as e:
                error = e
        if self.dist.any(error is not None):
            raise error or CheckpointWriteError(f"rank 0 could not write checkpoint step {self.step}; see its log")
        self.saved_step = self.step

    def _state_info(self, data: PreparedData) -> dict[str, Any]:
        c = self.config
        return {"config": c.to_dict(), "extra_config": self.extra_config, "data_fingerprint": data.fingerprint,
                "base_fingerprint": self.model.base_fingerprint, "template": self.template,
                "global_micro_batch": c.batch_size * self.dist.world,
                "world_size": self.dist.world, "elapsed_s": self.elapsed()}

    def _check_resumable(self, state: TrainState, data: PreparedData) -> None:
        """Refuse a checkpoint of another trajectory: other data, batches, accumulation, seed or template."""
        c, saved = self.config, state.info.get("config", {})
        pairs = {"data (fingerprint of the encoded samples)": (state.info.get("data_fingerprint"), data.fingerprint),
                 "batch_size x processes": (state.info.get("global_micro_batch"), c.batch_size * self.dist.world),
                 "grad_accum": (saved.get("grad_accum"), c.grad_accum), "seed": (saved.get("seed"), c.seed),
                 "template": (state.info.get("template"), self.template)}
        diff = [f"{k}: checkpoint {then!r}, now {now!r}" for k, (then, now) in pairs.items() if then != now]
        if diff:
            raise TrainStateError(f"cannot resume from {state.path}: the run differs ({'; '.join(diff)}). "
                                  "Resume with the original settings, or start fresh in another output_dir")

    def elapsed(self) -> float:
        return self._elapsed_before + (time.perf_counter() - self._started)

    # -- the run -------------------------------------------------------------------------------

    def run(self, train_source: Any, eval_source: Any = None) -> TrainResult:
        try:
            return self._run(train_source, eval_source)
        finally:
            self.dist.close()

    def _run(self, train_source: Any, eval_source: Any) -> TrainResult:
        c, d = self.config, self.dist
        torch.manual_seed(c.seed)
        self._started, self._elapsed_before = time.perf_counter(), 0.0
        self.setup()
        self.model.adapter.template = self.template
        if d.main:
            self._say(self.model.summary())
        train_data = self.prepare(train_source)
        eval_data = self.prepare(eval_source, eval_split=True) if eval_source is not None else None
        self._say(format_data_summary("train", train_data.summary))
        if eval_data is not None:
            self._say(format_data_summary("eval", eval_data.summary))
        self._setup_prefix_cache()

        sampler = LengthGroupedBatchSampler([len(s) for s in train_data.samples], c.batch_size * d.world,
                                            seed=c.seed, group_factor=50 if c.group_by_length else 1)
        n_batches = len(sampler.batches(0))
        self.accum = min(c.grad_accum, n_batches)
        if self.accum < c.grad_accum:
            self._say(f"grad_accum {c.grad_accum} is more than the {n_batches} micro-batches of an epoch: each step "
                      f"accumulates {self.accum}")
        steps_per_epoch = math.ceil(n_batches / c.grad_accum)
        start_epoch, start_batch = self._resume_or_start(train_data, eval_data, n_batches)
        self._say(f"{len(train_data.samples)} samples, {n_batches} micro-batches of {c.batch_size} x {d.world} "
                  f"process(es), {steps_per_epoch} steps/epoch, effective batch {self.effective_batch}, "
                  f"peak lr {self.peak_lr():.3g}")

        bar = tqdm(total=steps_per_epoch * c.epochs, initial=self.step, desc="training", unit="step",
                   disable=not (c.progress and d.main), dynamic_ncols=True)
        with self._stop_on_signals():
            for epoch in range(start_epoch, c.epochs):
                batches = sampler.batches(epoch)
                first = start_batch if epoch == start_epoch else 0
                for pos in range(first, n_batches, c.grad_accum):
                    self._step(train_data, batches, epoch, pos, n_batches, bar)
                    if self._must_stop():
                        bar.close()
                        return self._finish(train_data, epoch, min(pos + c.grad_accum, n_batches), n_batches,
                                            interrupted=True)
                if eval_data is not None:
                    self._log_eval(eval_data, epoch=epoch + 1)
                if self._must_stop() and epoch + 1 < c.epochs:
                    bar.close()
                    return self._finish(train_data, epoch, n_batches, n_batches, interrupted=True)
        bar.close()
        return self._finish(train_data, c.epochs - 1, n_batches, n_batches, interrupted=False)

    def _resume_or_start(self, data: PreparedData, eval_data: PreparedData | None, n_batches: int
                         ) -> tuple[int, int]:
        """Restore the latest checkpoint when resuming (epoch, next micro-batch), else start a fresh log."""
        c = self.config
        checkpoint = find_checkpoint(self.ckpt_root) if c.resume else None
        if checkpoint is None:
            if c.resume:
                self._say(f"no checkpoint in {self.ckpt_root}: starting from scratch")
            self._open_run_dir()
            if self.dist.main:
                (self.out / LOG_FILE).unlink(missing_ok=True)
            if eval_data is not None:
                self._log_eval(eval_data, epoch=0)
            return 0, 0
        state = load_checkpoint(checkpoint, self.model, self.optimizer, self.param_names, c.allow_base_mismatch)
        self._check_resumable(state, data)
        self._open_run_dir()
        self.step = self.saved_step = state.step
        self._elapsed_before = float(state.info.get("elapsed_s", 0.0))
        self._trim_log(state)
        self._say(f"resumed from {checkpoint} (step {self.step}, epoch {state.epoch + 1}, "
                  f"micro-batch {state.batch}/{n_batches})")
        return state.epoch, state.batch

    def _open_run_dir(self) -> None:
        """The run is known to start: only now is anything written in output_dir (a refused resume or a
        bad input leaves an earlier run's files as they were)."""
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out / CONFIG_FILE,
                              json.dumps({**self.extra_config, **self.config.to_dict()}, indent=1))
            remove_stale_temporaries(self.ckpt_root)

    def _must_stop(self) -> bool:
        """Ctrl-C / SIGTERM seen by any process (all processes stop at the same step)."""
        return self.dist.any(self.stop_requested) if self.dist.world > 1 else self.stop_requested

    def _step(self, data: PreparedData, batches: list[list[int]], epoch: int, pos: int, n_batches: int,
              bar: tqdm) -> None:
        """One optimizer step at micro-batch `pos` of `epoch`, logged, with a checkpoint every save_every."""
        c = self.config
        group = batches[pos:pos + c.grad_accum]
        lr = self.learning_rate(epoch + pos / n_batches)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        t0 = time.perf_counter()
        loss, grad_norm = self.train_step(data, group)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self._non_finite(data, group, epoch, pos, n_batches, loss, grad_norm)
            return
        self.step += 1
        seconds = time.perf_counter() - t0
        tokens = sum(len(data.samples[i]) for b in group for i in b)
        self._log({"type": "train", "step": self.step, "epoch": round(epoch + min(pos + c.grad_accum, n_batches)
                                                                      / n_batches, 4),
                   "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
                   "label_tokens": sum(data.label_counts[i] for b in group for i in b),
                   "tokens_per_s": round(tokens / max(seconds, 1e-9), 1), "elapsed_s": round(self.elapsed(), 3),
                   "gate_abs_max": float(torch.tanh(self.model.adapter.gates.detach()).abs().max())})
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / max(seconds, 1e-9):.0f}")
        bar.update(1)
        if c.save_every and self.step % c.save_every == 0:
            self._checkpoint(data, epoch, min(pos + c.grad_accum, n_batches), n_batches)

    def _non_finite(self, data: PreparedData, group: list[list[int]], epoch: int, pos: int, n_batches: int,
                    loss: float, grad_norm: float) -> None:
        """Report the batch behind a NaN/inf; skip it, or checkpoint the state before it and stop."""
        ids = [str(data.samples[i].id) for b in group for i in b]
        what = f"loss {loss} (gradient norm {grad_norm}) at step {self.step + 1}, epoch {epoch + 1}, " \
               f"micro-batches {pos}-{pos + len(group) - 1}, samples {', '.join(ids)}"
        self._log({"type": "nonfinite", "step": self.step + 1, "epoch": epoch, "batch": pos, "loss": str(loss),
                   "grad_norm": str(grad_norm), "samples": ids, "action": self.config.on_nonfinite})
        if self.config.on_nonfinite == "skip":
            self._say(f"skipped a non-finite {what}; the adapter was not updated by it")
            return
        if self.saved_step != self.step:
            self._checkpoint(data, epoch, pos, n_batches)  # the state before this batch: still good
        raise NonFiniteLossError(
            f"non-finite {what}. The adapter was not updated by this batch; the checkpoint "
            f"{self.ckpt_root / checkpoint_name(self.step)} holds the state before it. Check those samples, "
            "or resume with --resume --on-nonfinite skip (TrainConfig(resume=True, on_nonfinite='skip'))")

    def _log_eval(self, data: PreparedData, epoch: int) -> None:
        loss = self.evaluate(data)
        self.eval_losses.append(loss)
        self._log({"type": "eval", "step": self.step, "epoch": epoch, "eval_loss": loss})
        self._say(f"epoch {epoch}: eval loss {loss:.4f}")

    def _setup_prefix_cache(self) -> None:
        c, model = self.config, self.model
        if c.prefix_cache == "off":
            return
        first = model.adapter.first_layer
        if first == 0:
            self._say("prefix cache: every layer is adapted, there is no frozen prefix to cache; turned off")
            return
        namespace = f"{model.base_fingerprint}:{first}:{model.base.tok_embeddings.weight.dtype}:{c.precision}"
        directory = Path(c.prefix_cache_dir) if c.prefix_cache_dir else self.out / "prefix_cache"
        self.prefix_cache = PrefixCache(c.prefix_cache, c.prefix_cache_mb, namespace, directory)

    def _finish(self, data: PreparedData, epoch: int, batch: int, n_batches: int, interrupted: bool) -> TrainResult:
        """Final checkpoint (unless just written), adapter file, summary, plot."""
        c, d = self.config, self.dist
        last = next((r for r in reversed(self.records) if r.get("type") == "train"), None)
        if self.saved_step != self.step:
            self._checkpoint(data, epoch, batch, n_batches)
        epochs_done = epoch + batch / n_batches
        summary = {"interrupted": interrupted, "steps": self.step, "epochs": round(epochs_done, 4),
                   "final_loss": last["loss"] if last else None, "eval_losses": self.eval_losses,
                   "elapsed_s": round(self.elapsed(), 2), "train_data": data.summary,
                   "effective_batch": self.effective_batch, "peak_lr": self.peak_lr(), "processes": d.world,
                   "fsdp": self.sharded, "frozen_mb_per_process": round(local_bytes(self.model.base) / 2**20, 3),
                   "checkpoint": str(self.ckpt_root / checkpoint_name(self.step))}
        if self.model.feature_cache is not None and self.model.vision is not None:
            summary["feature_cache"] = self.model.feature_cache.stats()
        if self.prefix_cache is not None:
            summary["prefix_cache"] = self.prefix_cache.stats()
        adapter_path = None
        if d.main:
            if not interrupted:
                from .adapter_file import save_adapter

                adapter_path = save_adapter(self.model, self.out / ADAPTER_FILE,
                                            training=self._training_summary(data, epochs_done, completed=True))
            atomic_write_text(self.out / SUMMARY_FILE, json.dumps(summary, indent=1))
            if c.plot and self.records:
                from .plot import plot_loss_curve

                plot_loss_curve(self.records, self.out / PLOT_FILE, title=f"{self.model.base_name} adapter")
            self._say(_format_run_summary(summary, adapter_path, self.out))
        return TrainResult(self.out, adapter_path, self.step, epochs_done, summary["final_loss"],
                           list(self.eval_losses), interrupted, summary)

    @contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """Ctrl-C / SIGTERM: finish the step, write a checkpoint, return. A second Ctrl-C aborts at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum: int, frame: Any) -> None:
            if self.stop_requested and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.stop_requested = True
            self._say(f"{signal.Signals(signum).name}: finishing this step, writing a checkpoint, then stopping "
                      "(Ctrl-C again to abort without one)")

        previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def local_bytes(module: nn.Module) -> int:
    """Bytes of parameters this process holds (its shards, under FSDP)."""
    total = 0
    for p in module.parameters():
        t = p.to_local() if hasattr(p, "to_local") else p  # a DTensor's shard under FSDP
        total += t.numel() * t.element_size()
    return total


def train(model: MMAdapter, train_data: Any = None, config: TrainConfig | None = None, eval_data: Any = None,
          *, extra_config: Mapping[str, Any] | None = None) -> TrainResult:
    """Train `model.adapter` (a fresh one is added when the model has none) and save it.

    train_data / eval_data: a .json/.jsonl path, "scienceqa:<dir>", a datasets.Dataset, a list of
    record dicts or of `Example`s (default: config.data / config.eval_data). Under torchrun every
    process calls this with its model on its own device. extra_config: more options to record in
    config.json (the CLI's model options).
    """
    config = config or TrainConfig()
    train_data = train_data if train_data is not None else config.data
    eval_data = eval_data if eval_data is not None else config.eval_data
    if train_data is None:
        raise ValueError("no training data: pass train_data or set TrainConfig.data (CLI: --data)")
    paths = {k: str(v) for k, v in (("data", train_data), ("eval_data", eval_data)) if isinstance(v, (str, os.PathLike))}
    config = dataclasses.replace(config, **paths)  # recorded in config.json with the model options: repeatable
    return Trainer(model, config, {**model_options(model), **dict(extra_config or {})}).run(train_data, eval_data)


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
    return options


def _format_run_summary(s: Mapping[str, Any], adapter_path: Path | None, out: Path) -> str:
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
