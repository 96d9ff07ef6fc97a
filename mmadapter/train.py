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

Outputs in output_dir: see train_log.py. Ctrl-C or SIGTERM finishes the current step, writes a
checkpoint and returns (interrupted=True).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .atomic import atomic_write_text
from .checkpoint import (CheckpointWriteError, TrainState, TrainStateError, checkpoint_name, find_checkpoint,
                         load_train_state, remove_stale_temporaries, save_checkpoint)
from .config import TrainConfig
from .data.encode import LengthGroupedBatchSampler, collate
from .distributed import Distributed
from .prefix_cache import PrefixCache, gather_prefix
from .stop_signals import StopRequest
from .train_data import PreparedData, format_data_summary, prepare_data
from .train_log import (ADAPTER_FILE, CONFIG_FILE, PLOT_FILE, SUMMARY_FILE, RunLog, TrainResult, format_run_summary,
                        model_options)

if TYPE_CHECKING:
    from .model import MMAdapter



class NonFiniteLossError(RuntimeError):
    """Training met a NaN/inf loss or gradient; the message names the batch and the checkpoint to resume."""


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
        self.accum = config.grad_accum  # micro-batches per step; fewer when an epoch has fewer (set in _run)
        self.step = 0
        self.saved_step: int | None = None  # step of the last checkpoint written or resumed
        self.log = RunLog(self.out, self.dist.main)
        self.stop = StopRequest(self.log.say)

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
        data = prepare_data(self.model, source, self.config, self.template, self.dist, eval_split,
                            known_images=self.image_features)
        self.log.say(format_data_summary("eval" if eval_split else "train", data.summary))
        return data

    # -- forward -------------------------------------------------------------------------------

    def loss_weights(self, data: PreparedData, indices: list[int]) -> list[float] | None:
        """Each sample's weight per labelled token: None (1 each) when the loss is per token, 1/its label
        count when it is per sample."""
        if self.config.loss_per == "token":
            return None
        return [1.0 / max(data.label_counts[i], 1) for i in indices]

    def batch_loss(self, data: PreparedData, indices: list[int], images: bool = True,
                   weighted: bool = True) -> Tensor:
        """Summed (weighted, `loss_weights`) token cross-entropy of some samples (a micro-batch share)."""
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
            weights = self.loss_weights(data, indices) if weighted else None
            weights = None if weights is None else torch.tensor(weights, device=self.device)
            return model.loss(tokens, labels, features, has_image, prefix=prefix, reduction="sum",
                              sample_weights=weights)

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
            total[0] += float(self.batch_loss(data, indices, weighted=False))
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

    def train_step(self, data: PreparedData, group: list[list[int]]) -> tuple[float, float]:
        """One optimizer step over global micro-batches; returns (mean loss, gradient norm).

        A non-finite loss or gradient leaves the adapter and the optimizer untouched and returns it.
        """
        flat = [i for batch in group for i in batch]
        weights = self.loss_weights(data, flat) or [1.0] * len(flat)
        n_labels = sum(data.label_counts[i] * w for i, w in zip(flat, weights))  # the labelled tokens' weights
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
        loss_sum = self.dist.sum_gradients(self.params, loss_sum)
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

    def _training_summary(self, data: PreparedData, epochs_done: float, completed: bool) -> dict[str, Any]:
        last = self.log.last_train()
        return {"steps": self.step, "epochs": round(epochs_done, 4), "completed": completed,
                "final_loss": last["loss"] if last else None,
                "eval_loss": self.log.eval_losses[-1] if self.log.eval_losses else None,
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
            result = self._run(train_source, eval_source)
            self.dist.barrier()  # no process tears the group down under another's last collective
            return result
        finally:
            self.dist.close()

    def _run(self, train_source: Any, eval_source: Any) -> TrainResult:
        """The whole run, top to bottom: set up, read data, resume, the epochs of optimizer steps, finish."""
        c, d = self.config, self.dist
        torch.manual_seed(c.seed)
        self._started, self._elapsed_before = time.perf_counter(), 0.0
        self.setup()
        self.model.adapter.template = self.template
        self.log.say(self.model.summary())
        train_data = self.prepare(train_source)
        eval_data = self.prepare(eval_source, eval_split=True) if eval_source is not None else None
        self._setup_prefix_cache()
        sampler = LengthGroupedBatchSampler([len(s) for s in train_data.samples], c.batch_size * d.world,
                                            seed=c.seed, group_factor=50 if c.group_by_length else 1)
        n_batches = len(sampler.batches(0))
        self.accum = min(c.grad_accum, n_batches)  # an epoch's micro-batches cap the accumulation
        start_epoch, start_batch = self._resume_or_start(train_data, eval_data, n_batches)
        bar = self._progress_bar(len(train_data.samples), n_batches)

        with self.stop.installed():
            for epoch in range(start_epoch, c.epochs):
                batches = sampler.batches(epoch)
                for pos in range(start_batch if epoch == start_epoch else 0, n_batches, c.grad_accum):
                    group, done = batches[pos:pos + c.grad_accum], min(pos + c.grad_accum, n_batches)
                    lr = self._set_learning_rate(epoch + pos / n_batches)
                    started = time.perf_counter()
                    loss, grad_norm = self.train_step(train_data, group)
                    if math.isfinite(loss) and math.isfinite(grad_norm):
                        self.step += 1
                        self._log_step(train_data, group, epoch + done / n_batches, loss, lr, grad_norm,
                                       time.perf_counter() - started, bar)
                        if c.save_every and self.step % c.save_every == 0:
                            self._checkpoint(train_data, epoch, done, n_batches)
                    else:
                        self._non_finite(train_data, group, epoch, pos, n_batches, loss, grad_norm)
                    if self._must_stop():
                        bar.close()
                        return self._finish(train_data, epoch, done, n_batches, interrupted=True)
                if eval_data is not None:
                    self._log_eval(eval_data, epoch=epoch + 1)
                if self._must_stop() and epoch + 1 < c.epochs:
                    bar.close()
                    return self._finish(train_data, epoch, n_batches, n_batches, interrupted=True)
        bar.close()
        return self._finish(train_data, c.epochs - 1, n_batches, n_batches, interrupted=False)

    def _progress_bar(self, n_samples: int, n_batches: int) -> tqdm:
        c, d = self.config, self.dist
        steps_per_epoch = math.ceil(n_batches / c.grad_accum)
        if self.accum < c.grad_accum:
            self.log.say(f"grad_accum {c.grad_accum} is more than the {n_batches} micro-batches of an epoch: each "
                         f"step accumulates {self.accum}")
        self.log.say(f"{n_samples} samples, {n_batches} micro-batches of {c.batch_size} x {d.world} process(es), "
                     f"{steps_per_epoch} steps/epoch, effective batch {self.effective_batch}, "
                     f"peak lr {self.peak_lr():.3g}")
        return tqdm(total=steps_per_epoch * c.epochs, initial=self.step, desc="training", unit="step",
                    disable=not (c.progress and d.main), dynamic_ncols=True)

    def _resume_or_start(self, data: PreparedData, eval_data: PreparedData | None, n_batches: int
                         ) -> tuple[int, int]:
        """Restore the latest checkpoint when resuming (epoch, next micro-batch), else start a fresh log."""
        c = self.config
        checkpoint = find_checkpoint(self.ckpt_root) if c.resume else None
        if checkpoint is None:
            if c.resume:
                self.log.say(f"no checkpoint in {self.ckpt_root}: starting from scratch")
            self._open_run_dir()
            self.log.start_fresh()
            if eval_data is not None:
                self._log_eval(eval_data, epoch=0)
            return 0, 0
        state = load_train_state(checkpoint, self.model, self.optimizer, self.param_names, c.allow_base_mismatch)
        self._check_resumable(state, data)
        self._open_run_dir()
        self.step = self.saved_step = state.step
        self._elapsed_before = float(state.info.get("elapsed_s", 0.0))
        self.log.trim(state.step, state.epoch)
        self.log.say(f"resumed from {checkpoint} (step {self.step}, epoch {state.epoch + 1}, "
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
        return self.dist.any(self.stop.requested) if self.dist.world > 1 else self.stop.requested

    def _set_learning_rate(self, epoch: float) -> float:
        lr = self.learning_rate(epoch)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return lr

    def _log_step(self, data: PreparedData, group: list[list[int]], epoch: float, loss: float, lr: float,
                  grad_norm: float, seconds: float, bar: tqdm) -> None:
        tokens = sum(len(data.samples[i]) for b in group for i in b)
        self.log.write({"type": "train", "step": self.step, "epoch": round(epoch, 4), "loss": loss, "lr": lr,
                        "grad_norm": grad_norm, "tokens": tokens,
                        "label_tokens": sum(data.label_counts[i] for b in group for i in b),
                        "tokens_per_s": round(tokens / max(seconds, 1e-9), 1), "elapsed_s": round(self.elapsed(), 3),
                        "gate_abs_max": float(torch.tanh(self.model.adapter.gates.detach()).abs().max())})
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / max(seconds, 1e-9):.0f}")
        bar.update(1)

    def _non_finite(self, data: PreparedData, group: list[list[int]], epoch: int, pos: int, n_batches: int,
                    loss: float, grad_norm: float) -> None:
        """Report the batch behind a NaN/inf; skip it, or checkpoint the state before it and stop."""
        ids = [str(data.samples[i].id) for b in group for i in b]
        what = f"loss {loss} (gradient norm {grad_norm}) at step {self.step + 1}, epoch {epoch + 1}, " \
               f"micro-batches {pos}-{pos + len(group) - 1}, samples {', '.join(ids)}"
        self.log.write({"type": "nonfinite", "step": self.step + 1, "epoch": epoch, "batch": pos, "loss": str(loss),
                   "grad_norm": str(grad_norm), "samples": ids, "action": self.config.on_nonfinite})
        if self.config.on_nonfinite == "skip":
            self.log.say(f"skipped a non-finite {what}; the adapter was not updated by it")
            return
        if self.saved_step != self.step:
            self._checkpoint(data, epoch, pos, n_batches)  # the state before this batch: still good
        raise NonFiniteLossError(
            f"non-finite {what}. The adapter was not updated by this batch; the checkpoint "
            f"{self.ckpt_root / checkpoint_name(self.step)} holds the state before it. Check those samples, "
            "or resume with --resume --on-nonfinite skip (TrainConfig(resume=True, on_nonfinite='skip'))")

    def _log_eval(self, data: PreparedData, epoch: int) -> None:
        loss = self.evaluate(data)
        self.log.write({"type": "eval", "step": self.step, "epoch": epoch, "eval_loss": loss})
        self.log.say(f"epoch {epoch}: eval loss {loss:.4f}")

    def _setup_prefix_cache(self) -> None:
        c, model = self.config, self.model
        if c.prefix_cache == "off":
            return
        first = model.adapter.first_layer
        if first == 0:
            self.log.say("prefix cache: every layer is adapted, there is no frozen prefix to cache; turned off")
            return
        namespace = f"{model.base_fingerprint}:{first}:{model.base.tok_embeddings.weight.dtype}:{c.precision}"
        directory = Path(c.prefix_cache_dir) if c.prefix_cache_dir else self.out / "prefix_cache"
        self.prefix_cache = PrefixCache(c.prefix_cache, c.prefix_cache_mb, namespace, directory)

    def _finish(self, data: PreparedData, epoch: int, batch: int, n_batches: int, interrupted: bool) -> TrainResult:
        """Final checkpoint (unless just written), adapter file, summary, plot."""
        c, d = self.config, self.dist
        last = next((r for r in reversed(self.log.records) if r.get("type") == "train"), None)
        if self.saved_step != self.step:
            self._checkpoint(data, epoch, batch, n_batches)
        epochs_done = epoch + batch / n_batches
        summary = {"interrupted": interrupted, "steps": self.step, "epochs": round(epochs_done, 4),
                   "final_loss": last["loss"] if last else None, "eval_losses": self.log.eval_losses,
                   "elapsed_s": round(self.elapsed(), 2), "train_data": data.summary,
                   "effective_batch": self.effective_batch, "peak_lr": self.peak_lr(), "processes": d.world,
                   "fsdp": self.sharded,
                   "frozen_mb_per_process": round(self.dist.local_bytes(self.model.base) / 2**20, 3),
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
            if c.plot and self.log.records:
                from .plot import plot_loss_curve

                plot_loss_curve(self.log.records, self.out / PLOT_FILE, title=f"{self.model.base_name} adapter")
            self.log.say(format_run_summary(summary, adapter_path, self.out))
        return TrainResult(self.out, adapter_path, self.step, epochs_done, summary["final_loss"],
                           self.log.eval_losses, interrupted, summary)


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
    paths = {k: str(v) for k, v in (("data", train_data), ("eval_data", eval_data))
             if isinstance(v, (str, os.PathLike))}
    config = dataclasses.replace(config, **paths)  # recorded in config.json with the model options: repeatable
    return Trainer(model, config, {**model_options(model), **dict(extra_config or {})}).run(train_data, eval_data)
