"""Resumable build stages: each stage runs once, records its settings, and is reused only for the same ones.

A stage folder holds `stage.json` ({"stage", "settings", "result", "seconds", "commit"}) once its work
finished. A rerun of the build with the same settings reuses the result (the build continues where it
stopped after a kill); with different settings it refuses, naming the settings that differ, instead of
silently keeping work made another way. Work inside a stage that can itself resume (adapter training
from its checkpoints, cached features) does so on its own.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_text

STAGE_FILE = "stage.json"


class StageMismatch(RuntimeError):
    """A finished stage was built with other settings than the ones requested now."""


def commit() -> str | None:
    """The repository commit this code runs from (None outside a git checkout)."""
    try:
        run = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           timeout=10, cwd=Path(__file__).resolve().parent).stdout.strip()
    return (run.stdout.strip() + ("+changes" if dirty else "")) if run.returncode == 0 else None


def _plain(value: Any) -> Any:
    """Settings as JSON would give them back (tuples become lists), so a rerun compares equal."""
    return json.loads(json.dumps(value))


def run_stage(folder: Path, name: str, settings: dict[str, Any], work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The stage's result: reused when finished with these settings, else computed by work() and recorded."""
    record = folder / STAGE_FILE
    settings = _plain(settings)
    if record.is_file():
        done = json.loads(record.read_text(encoding="utf-8"))
        if done["settings"] != settings:
            changed = sorted(k for k in settings.keys() | done["settings"].keys()
                             if settings.get(k) != done["settings"].get(k))
            raise StageMismatch(
                f"stage '{name}' in {folder} was built with other settings ({', '.join(changed)}: "
                f"{ {k: done['settings'].get(k) for k in changed} } there, { {k: settings.get(k) for k in changed} } "
                f"now). Build into another --out, or delete {folder} to rebuild this stage and the ones after it.")
        print(f"stage '{name}': reusing {folder} (finished {done['seconds']:.0f} s of work earlier)")
        return done["result"]
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    result = _plain(work())
    body = {"stage": name, "settings": settings, "result": result, "seconds": round(time.time() - t0, 1),
            "commit": commit()}
    atomic_write_text(record, json.dumps(body, indent=1))
    print(f"stage '{name}': done in {body['seconds']:.0f} s")
    return result


def stage_seconds(out: Path) -> dict[str, float]:
    """Measured time of every finished stage under a build folder."""
    times = {}
    for record in sorted(out.glob(f"*/{STAGE_FILE}")):
        body = json.loads(record.read_text(encoding="utf-8"))
        times[body["stage"]] = body["seconds"]
    return times
