"""The same torch work on the process's main thread and on a long-lived second thread.

The batch engine decodes on a thread of its own inside the app's process (mmadapter/batching.py), and in
the app its steps and prefills take longer than the same work timed alone. This measures one part of that
gap with nothing else running: a few-row `F.linear` over one of SmolLM2-135M's MLP weights (1536 x 576; 1, 8
and 20 rows: a decoding step of one and of eight rows, a short prefill) and a 20-token prefill of the
embedded base, alternately on the main thread and on one worker thread started once and kept (as the
engine's is), each a median of `runs` timings of many calls. The ratio column is worker / main.
"""

from __future__ import annotations

import queue
import statistics
import threading
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .common import BASE, report, setup_threads

CALLS = 200  # calls per timing of a product
PREFILLS = 5  # calls per timing of a prefill


class Worker:
    """One thread that runs the callables it is given, in order, and hands back their results."""

    def __init__(self) -> None:
        self.jobs: queue.Queue = queue.Queue()
        self.results: queue.Queue = queue.Queue()
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while True:
            self.results.put(self.jobs.get()())

    def __call__(self, fn: Callable[[], float]) -> float:
        self.jobs.put(fn)
        return self.results.get()


def per_call_us(fn: Callable[[], object], calls: int) -> Callable[[], float]:
    """A timing of `calls` calls of fn (after one untimed), microseconds per call."""

    def timed() -> float:
        with torch.inference_mode():
            fn()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            return (time.perf_counter() - start) / calls * 1e6

    return timed


def run(runs: int = 5) -> str:
    from mmadapter import load_base

    threads = setup_threads()
    weight = torch.randn(1536, 576)
    base = load_base(BASE).base
    tokens = torch.randint(100, 49152, (1, 20), generator=torch.Generator().manual_seed(0))
    cases = {f"F.linear, {rows} row{'s' * (rows > 1)} x 576 -> 1536": per_call_us(
        lambda x=torch.randn(rows, 576): F.linear(x, weight), CALLS) for rows in (1, 8, 20)}
    cases["prefill of 20 tokens, embedded base"] = per_call_us(lambda: base(tokens), PREFILLS)
    worker = Worker()
    rows = []
    for name, timed in cases.items():
        main, other = [], []
        for _ in range(2 * runs + 1):  # alternated, so a slow spell of the machine hits both
            main.append(timed())
            other.append(worker(timed))
        m, o = statistics.median(main), statistics.median(other)
        rows.append([name, round(m, 1), round(o, 1), f"{o / m:.2f}x"])
        print(f"{name}: main {m:.1f} us, worker thread {o:.1f} us", flush=True)
    return report("threads", f"The same work on the main thread and on a second thread ({threads} torch threads; "
                  f"median of {2 * runs + 1}, alternated)", ["work", "main thread us", "worker thread us",
                                                             "worker / main"], rows)
