"""`make bench` / `python -m bench`: every benchmark in one process, a Markdown report at the end.

Options: --only NAME (repeatable), --runs N (default 5), --device cuda (the GPU script instead).
Results: bench/results/<name>.json; bench/results/REPORT.md gathers the latest result of every benchmark,
so `--only` refreshes one table and keeps the others.
"""

from __future__ import annotations

import argparse
import time

from . import (bandwidth, decode, epoch, matvec, memory, prefix_cache, quant, quant_kernels, serving, threads,
               train_step, v2)
from .common import RESULTS, machine, markdown_of, setup_threads

SUITE = {"bandwidth": bandwidth.run, "matvec": matvec.run, "train_step": train_step.run, "epoch": epoch.run,
         "prefix_cache": prefix_cache.run, "decode": decode.run, "v2": v2.run, "memory": memory.run,
         "quant_kernels": quant_kernels.run, "quant": quant.run, "threads": threads.run, "serving": serving.run}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--only", action="append", choices=sorted(SUITE))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.device != "cpu":
        from . import gpu

        gpu.run(args.device)
        return
    threads = setup_threads()
    m = machine()
    for name, fn in SUITE.items():
        if args.only and name not in args.only:
            continue
        start = time.perf_counter()
        if name in ("bandwidth", "memory", "serving"):  # one load run, or not timings: nothing to take a median of
            fn()
        else:
            fn(runs=args.runs)
        print(f"({name}: {time.perf_counter() - start:.0f} s)\n", flush=True)
    parts = [f"# mmadapter benchmarks\n\n{m['cpu']}, {threads} threads, torch {m['torch']}; command: `make bench`\n"]
    parts += [md for md in map(markdown_of, SUITE) if md]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "REPORT.md").write_text("\n".join(parts))


if __name__ == "__main__":
    main()
