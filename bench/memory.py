"""Peak resident memory of training (batch 4 x 256, K=10, L=30, three steps) and of decoding.

Each figure comes from a fresh process, so it is that workload's own peak (model load included).
"""

from __future__ import annotations

from .common import peak_in_subprocess, report


def run() -> str:
    rows = []
    for label, module, args in (("train step, L=30", "bench.train_step", ["--layers", "30"]),
                                ("decode, batch 1, L=30", "bench.decode", [])):
        anchor = peak_in_subprocess(module, "--peak", "anchor", *args)
        mine = peak_in_subprocess(module, "--peak", "ours", *args)
        rows.append([label, round(anchor), round(mine), f"{mine / anchor:.2f}"])
    return report("memory", "Peak resident memory (MiB, one process each)",
                  ["workload", "transformers + PEFT", "mmadapter", "ratio"], rows)


if __name__ == "__main__":
    run()
