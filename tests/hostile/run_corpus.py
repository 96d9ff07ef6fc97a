"""Feed every file of a hostile corpus (make_corpus.py) to its loader; print one JSON line per case.

    python tests/hostile/run_corpus.py CORPUS_DIR

Run in a fresh process: the controls run first (they import and warm up every library), then each
hostile case under a wall-clock timer, with the peak RSS reset before it (/proc/self/clear_refs), so
that the peak it reports is the case's own. A line holds the error class (null when the load
succeeded), its message, the seconds taken and how far the case raised RSS above its start, in MiB.
"""

from __future__ import annotations

import json
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(Path(__file__).parent)]

from make_corpus import Case, load_cases  # noqa: E402

CASE_TIMEOUT_S = 20  # far above any honest load here; a looping parser is cut off and reported


class CaseTimeout(Exception):
    pass


def reset_peak_rss() -> float:
    """Reset the process's peak RSS to its current RSS (Linux 4.0+); returns that baseline in MiB.

    Where the reset is not available, the baseline is the peak so far: the growth measured is then
    only what a case adds above every earlier peak (a lower bound).
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return peak_rss_mib()
    return _proc_status_mib("VmRSS")


def peak_rss_mib() -> float:
    try:
        return _proc_status_mib("VmHWM")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB, as /proc does


def _proc_status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise OSError(f"no {field} in /proc/self/status")


def loaders() -> dict[str, Any]:
    import logging

    from mmadapter import load_base
    from mmadapter.data.records import read_json
    from mmadapter.data.scienceqa import load_image as problem_image
    from mmadapter.data.scienceqa import load_scienceqa
    from mmadapter.images import load_image
    from mmadapter.interop import adapter_from_file, import_adapter
    from mmadapter.tokenizer import Tokenizer
    from mmadapter.weights import load_base_checkpoint

    logging.disable(logging.WARNING)  # the tiny preset warns that its weights are random
    tiny = load_base("tiny")

    def tokenizer(path: Path) -> Any:
        tok = Tokenizer.from_dir(path) if path.is_dir() else Tokenizer.from_file(path)
        tok.decode(tok.encode("hello world"))
        if tok.chat_template:
            tok.apply_chat_template([{"role": "user", "content": "hello"}])
        return tok

    def scienceqa(path: Path) -> Any:
        problems, _ = load_scienceqa(path, split="test")
        for problem in problems:
            if isinstance(problem.image, str) and not Path(problem.image).resolve().is_relative_to(path.resolve()):
                raise RuntimeError(f"problem {problem.pid} reads {problem.image}, outside {path}")
            problem_image(problem)
        return problems

    return {
        "base": load_base_checkpoint,
        "tokenizer": tokenizer,
        "adapter": adapter_from_file,
        "interop": lambda path: import_adapter(tiny, path),
        "data": read_json,
        "scienceqa": scienceqa,
        "image": load_image,
    }


def run_case(case: Case, root: Path, load: Any) -> dict[str, Any]:
    before = reset_peak_rss()
    start = time.perf_counter()
    error: BaseException | None = None
    signal.setitimer(signal.ITIMER_REAL, CASE_TIMEOUT_S)
    try:
        load(root / case.path)
    except BaseException as e:  # noqa: BLE001 - a crash of any kind is what we are looking for
        error = e
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    return {"name": case.name, "loader": case.loader, "expect": case.expect, "names": case.names,
            "error": None if error is None else type(error).__name__,
            "is_value_error": isinstance(error, ValueError),
            "message": "" if error is None else str(error)[:2000],
            "seconds": round(time.perf_counter() - start, 4), "peak_growth_mib": round(peak_rss_mib() - before, 1)}


def main(root: Path) -> None:
    def on_timeout(*_: Any) -> None:
        raise CaseTimeout(f"still running after {CASE_TIMEOUT_S} s")

    signal.signal(signal.SIGALRM, on_timeout)
    cases = load_cases(root)
    load = loaders()
    for case in sorted(cases, key=lambda c: c.expect is not None):  # controls first: they warm up the imports
        print(json.dumps(run_case(case, root, load[case.loader])), flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} CORPUS_DIR")
    main(Path(sys.argv[1]))
