"""Distributed training: `torchrun --nproc_per_node 2 -m mmadapter train` (gloo on CPU) must give the
adapter of one process with the same global batch, and only rank 0 may write files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mmadapter.adapter_file import read_adapter  # noqa: E402
from mmadapter.plot import read_log  # noqa: E402
from mmadapter.train import train  # noqa: E402
from test_train import (COLOURS, draw_picture, instruction_records, make_text_base, make_tower_dir,  # noqa: E402
                        multimodal_model, one_thread, quick_config, subprocess_env)  # noqa: F401


@pytest.mark.parametrize("fsdp", [False, True], ids=["replicated", "fsdp"])
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path: Path, fsdp: bool) -> None:
    """Replicated base (all-reduce of adapter gradients) or FSDP-sharded layers: the same adapter."""
    base = make_text_base(tmp_path / "base")
    (tmp_path / "towers").mkdir()
    tower = make_tower_dir(tmp_path / "towers" / "tiny_vit")
    rng = np.random.default_rng(2)
    pictures = [draw_picture(tmp_path / f"{i}.png", colour, rng) for i, colour in enumerate(COLOURS)]
    # Mixed data: some micro-batch shares have no image, so the projector is unused on one rank only;
    # 21 samples leave a last micro-batch of one sample, so rank 1 has no share of it.
    records = [{**r, "image": pictures[(i // 3) % 4]} if i % 3 == 0 else r
               for i, r in enumerate(instruction_records(21, 9))]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    settings = dict(epochs=2, grad_accum=2, lr=0.05, warmup_epochs=1.0, save_every=3)

    # One process: micro-batches of 4.
    single = train(multimodal_model(base, tower), str(data), quick_config(tmp_path / "single", batch_size=4,
                                                                         **settings))

    # Two processes: micro-batches of 2 each, the same global micro-batch of 4.
    out = tmp_path / "ddp"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "mmadapter", "train", "--base", str(base), "--vision", f"local-dir:{tower}",
           "--vision-scales", "2", "--projector-hidden", "32", "--n-prompts", "4",
           "--n-layers", "2", "--data", str(data), "--output-dir", str(out), "--batch-size", "2",
           "--no-progress", "--no-plot", *flags, *(["--fsdp"] if fsdp else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]

    expected = read_adapter(single.adapter_path)[1]
    got = read_adapter(out / "adapter.safetensors")[1]
    assert set(got) == set(expected) and "projector.fc1.weight" in got
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5)
    assert not torch.equal(got["gates"], torch.zeros_like(got["gates"]))

    # Rank 0 alone wrote: one log line per step, one summary, one set of checkpoints.
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == single.steps == 6
    whole = single.summary["frozen_mb_per_process"]
    if fsdp:  # each process holds half of every attention and MLP weight, and the rest whole
        from mmadapter import load_base

        sharded = sum(p.numel() * p.element_size() for layer in load_base(str(base)).base.layers
                      for part in (layer.attention, layer.feed_forward) for p in part.parameters()) / 2**20
        assert abs(summary["frozen_mb_per_process"] - (whole - sharded / 2)) < 0.002
        assert summary["fsdp"]
    else:
        assert summary["frozen_mb_per_process"] == whole
    assert summary["effective_batch"] == single.summary["effective_batch"] == 8
    assert [r["step"] for r in read_log(out / "train_log.jsonl") if r["type"] == "train"] == list(range(1, 7))
    single_log = [r["loss"] for r in read_log(single.output_dir / "train_log.jsonl")]
    ddp_log = [r["loss"] for r in read_log(out / "train_log.jsonl")]
    np.testing.assert_allclose(ddp_log, single_log, rtol=1e-5)
    assert summary["feature_cache"]["tower_calls"] == 2  # rank 0 encoded its half of the 4 pictures
    assert proc.stderr.count("finished after") == 1
