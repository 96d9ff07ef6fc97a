"""Later epochs with the frozen-prefix cache at L=8 against the first epoch, through `mmadapter.train`.

With L=8 of SmolLM2's 30 layers adapted, epoch 1 runs all 30 layers and stores the output of the
frozen bottom 22 per sample; epochs 2..E start at layer 22. Epoch times come from the training log.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np

from mmadapter import TrainConfig, train
from mmadapter.plot import read_log

from .common import ours, report, setup_threads
from .epoch import synthetic_lengths

WORDS = ("the model reads a short text about science history music water light energy cells planets "
         "and writes an answer with clear simple words for every reader who asks").split()


def records(n: int, seed: int = 0) -> list[dict]:
    """Alpaca records whose word counts follow the benchmark's length distribution."""
    rng = np.random.default_rng(seed)
    out = []
    for prompt, response in synthetic_lengths(n, seed):
        words = lambda k: " ".join(rng.choice(WORDS, size=max(1, int(k * 0.75))))  # noqa: E731
        out.append({"instruction": words(prompt - 41), "input": "", "output": words(response)})
    return out


def epoch_times(log: Path) -> list[float]:
    """Seconds per epoch from train_log.jsonl (elapsed at the last step of each epoch)."""
    ends: dict[int, float] = {}
    for r in read_log(log):
        if r.get("type") == "train":
            ends[int(np.ceil(r["epoch"] - 1e-9))] = r["elapsed_s"]
    marks = [0.0] + [ends[e] for e in sorted(ends)]
    return [b - a for a, b in zip(marks, marks[1:])]


def one_run(data: Path, epochs: int, workdir: Path) -> list[float]:
    model = ours(8)
    config = TrainConfig(epochs=epochs, batch_size=4, warmup_epochs=0.5, output_dir=str(workdir),
                         prefix_cache="memory", save_every=0, progress=False, plot=False)
    train(model, str(data), config)
    return epoch_times(workdir / "train_log.jsonl")


def run(runs: int = 5, epochs: int = 3, n: int = 64) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data.json"
        data.write_text(json.dumps(records(n)))
        results = [one_run(data, epochs, Path(tmp) / f"run{i}") for i in range(runs + 1)][1:]  # first: warm-up
    first = statistics.median(r[0] for r in results)
    later = statistics.median(statistics.mean(r[1:]) for r in results)
    rows = [["epoch 1 (computes and stores the prefix)", round(first, 2), "1.00x"],
            [f"epochs 2..{epochs} (start at layer 22)", round(later, 2), f"{first / later:.2f}x"]]
    return report("prefix_cache", f"Frozen-prefix cache, K=10, L=8, {n} samples, batch 4 (s/epoch, median of {runs})",
                  ["epoch", "s/epoch", "speed-up"], rows, {"runs": results})


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    setup_threads()
    run(parser.parse_args().runs)
