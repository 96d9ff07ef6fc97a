"""Where a batch engine's time goes, per request and for the engine as a whole.

The engine thread adds `time.perf_counter` intervals to plain counters as it works: a few calls per step,
admission and prefill chunk, nothing per layer, so the profile is always on. Per request: seconds queued
(submitted → admitted), in the tower (its image's features: 0 without an image), in the rest of its admission
(prompt K/V, cache growth, the reuse copy), in its own prefill chunks (prompt tokens computed there vs copied
from the reuse cache), held in a row while the engine admitted or prefilled others, in the batched steps it
took part in (their whole time, and its share: each step's time over the rows decoding in it), to its first
token, and in all. For the engine: wall time split into idle, tower, admission, prefill, the batched forward
and handing the tokens out, and the steps by how many rows decoded in them.

`snapshot()` is a plain JSON-able dict; `difference(before, after)` is what happened between two of them.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

PHASES = ("idle", "tower", "admit", "prefill", "step", "emit")  # engine wall time, split (+ "other": the rest)
COUNTS = ("admitted", "images", "prefill_chunks", "prefilled_tokens", "reused_tokens", "steps", "rows_computed",
          "slots_attended", "real_slots", "cache_grows", "compactions", "finished")


@dataclass
class RequestTimes:
    """One request's seconds and token counts (see the module's docstring)."""

    submitted: float  # perf_counter at submit
    prompt_tokens: int
    image: bool
    seq: int = 0  # 1, 2, ... in the order requests finished (0: not yet)
    queued_s: float = 0.0
    tower_s: float = 0.0
    admit_s: float = 0.0
    prefill_s: float = 0.0
    prefilled_tokens: int = 0
    reused_tokens: int = 0
    waiting_admit_s: float = 0.0  # held while others were admitted (their tower included)
    waiting_prefill_s: float = 0.0  # held while others' prompt chunks were prefilled
    decode_steps: int = 0
    decode_s: float = 0.0  # the whole time of the steps it decoded in
    decode_share_s: float = 0.0  # its share of them: each step's time / the rows decoding in it
    first_token_s: float | None = None  # submitted → its first token handed out
    total_s: float = 0.0  # submitted → finished
    new_tokens: int = 0
    outcome: str = ""  # "done", "cancelled" or "failed"


class EngineProfile:
    """The counters one `BatchEngine` keeps; the engine thread writes, `snapshot` may read from any thread."""

    def __init__(self, keep: int = 4096) -> None:
        """keep: how many finished requests' records are kept (the oldest go first)."""
        self._lock = threading.Lock()
        self.started = time.perf_counter()
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.counts = dict.fromkeys(COUNTS, 0)
        self.by_rows: dict[int, list] = {}  # rows decoding in a step -> [steps, seconds of their forward]
        self.finished: deque[RequestTimes] = deque(maxlen=keep)

    def idle(self, seconds: float) -> None:
        with self._lock:
            self.seconds["idle"] += seconds

    def admitted(self, times: RequestTimes, start: float, tower_s: float, reused: int,
                 others: Iterable[RequestTimes]) -> None:
        """The request's admission ran from `start` to now (`tower_s` of it in the tower)."""
        seconds = time.perf_counter() - start
        with self._lock:
            times.queued_s = start - times.submitted
            times.tower_s, times.admit_s, times.reused_tokens = tower_s, seconds - tower_s, reused
            self.seconds["tower"] += tower_s
            self.seconds["admit"] += seconds - tower_s
            self.counts["admitted"] += 1
            self.counts["images"] += times.image
            self.counts["reused_tokens"] += reused
            for other in others:
                other.waiting_admit_s += seconds

    def chunk(self, times: RequestTimes, start: float, tokens: int, others: Iterable[RequestTimes]) -> None:
        """One prefill chunk of `tokens` prompt tokens ran from `start` to now."""
        seconds = time.perf_counter() - start
        with self._lock:
            times.prefill_s += seconds
            times.prefilled_tokens += tokens
            self.seconds["prefill"] += seconds
            self.counts["prefill_chunks"] += 1
            self.counts["prefilled_tokens"] += tokens
            for other in others:
                other.waiting_prefill_s += seconds

    def step(self, start: float, rows: Sequence[RequestTimes], rows_computed: int, slots: int,
             real_slots: int) -> None:
        """One batched forward ran from `start` to now. rows: the decoding requests; rows_computed: the cache
        rows it ran over (padding included); slots: the cache slots each row attended; real_slots: the slots
        holding the rows' own tokens, all rows together."""
        seconds, n = time.perf_counter() - start, len(rows)
        with self._lock:
            self.seconds["step"] += seconds
            for key, value in (("steps", 1), ("rows_computed", rows_computed), ("slots_attended", slots * n),
                               ("real_slots", real_slots)):
                self.counts[key] += value
            bucket = self.by_rows.setdefault(n, [0, 0.0])
            bucket[0] += 1
            bucket[1] += seconds
            for times in rows:
                times.decode_steps += 1
                times.decode_s += seconds
                times.decode_share_s += seconds / n

    def emitted(self, start: float) -> None:
        """A step's tokens were sampled and handed out (finished requests stored for reuse) from `start` to now."""
        seconds = time.perf_counter() - start
        with self._lock:
            self.seconds["emit"] += seconds

    def cache_grew(self) -> None:
        with self._lock:
            self.counts["cache_grows"] += 1

    def compacted(self) -> None:
        with self._lock:
            self.counts["compactions"] += 1

    def first_token(self, times: RequestTimes) -> None:
        times.first_token_s = time.perf_counter() - times.submitted

    def finish(self, times: RequestTimes, new_tokens: int, outcome: str) -> None:
        with self._lock:
            if times.seq:  # already recorded (a failure reported twice)
                return
            self.counts["finished"] += 1
            times.seq, times.new_tokens, times.outcome = self.counts["finished"], new_tokens, outcome
            times.total_s = time.perf_counter() - times.submitted
            self.finished.append(times)

    def snapshot(self) -> dict[str, Any]:
        """Totals since the engine started and the finished requests' records (oldest first)."""
        with self._lock:
            seconds = dict(self.seconds)
            wall = time.perf_counter() - self.started
            seconds["other"] = wall - sum(seconds.values())
            return {"wall_s": wall, "seconds": seconds, "counts": dict(self.counts),
                    "by_rows": {str(n): {"steps": s, "seconds": t} for n, (s, t) in sorted(self.by_rows.items())},
                    "requests": [_record(t) for t in self.finished]}


def _record(times: RequestTimes) -> dict[str, Any]:
    record = asdict(times)
    del record["submitted"]  # a clock reading: means nothing outside this process
    return record


def difference(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What happened between two snapshots of one engine: the totals' differences and the requests that
    finished in between."""
    by_rows = {}
    for n, b in after["by_rows"].items():
        a = before["by_rows"].get(n, {"steps": 0, "seconds": 0.0})
        if b["steps"] > a["steps"]:
            by_rows[n] = {"steps": b["steps"] - a["steps"], "seconds": b["seconds"] - a["seconds"]}
    last = before["counts"]["finished"]
    return {"wall_s": after["wall_s"] - before["wall_s"],
            "seconds": {k: v - before["seconds"][k] for k, v in after["seconds"].items()},
            "counts": {k: v - before["counts"][k] for k, v in after["counts"].items()},
            "by_rows": by_rows, "requests": [r for r in after["requests"] if r["seq"] > last]}


def summary(profile: dict[str, Any]) -> dict[str, float]:
    """The figures a reader wants from a profile (a snapshot or a difference): shares of the engine's wall
    time, the mean step, and per request means."""
    wall, seconds, counts = profile["wall_s"], profile["seconds"], profile["counts"]
    steps = max(counts["steps"], 1)
    out = {f"{k} %": 100 * v / wall if wall > 0 else 0.0 for k, v in seconds.items()}
    out["wall s"] = wall
    out["steps"] = counts["steps"]
    out["rows per step"] = sum(int(n) * b["steps"] for n, b in profile["by_rows"].items()) / steps
    out["rows computed per step"] = counts["rows_computed"] / steps
    out["ms per step"] = 1000 * seconds["step"] / steps
    out["attended / real slots"] = counts["slots_attended"] / max(counts["real_slots"], 1)
    requests = profile["requests"]
    for key in ("queued_s", "tower_s", "admit_s", "prefill_s", "waiting_admit_s", "waiting_prefill_s",
                "decode_share_s", "decode_s", "first_token_s", "total_s"):
        values = [r[key] for r in requests if r[key] is not None]
        out[f"mean {key}"] = sum(values) / len(values) if values else 0.0
    out["requests"] = len(requests)
    out["prefilled tokens"] = sum(r["prefilled_tokens"] for r in requests)
    out["reused tokens"] = sum(r["reused_tokens"] for r in requests)
    return out
