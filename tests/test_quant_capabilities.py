"""The quantised tests again under every other CPU kernel family this machine can run.

PyTorch picks its CPU kernels per process (`ATEN_CPU_CAPABILITY`: default, avx2, avx512), and its 4-bit
kernel packs weights differently under each, so one machine checks every layout it can execute by
rerunning tests/test_quant.py in a subprocess per capability. The session's summary lists which ran.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ORDER = ("default", "avx2", "avx512")  # each runs on a CPU that runs the next one


def _capability(env_value: str | None) -> str:
    """The capability a fresh process dispatches to (lower-cased), with ATEN_CPU_CAPABILITY set or not."""
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    if env_value:
        env["ATEN_CPU_CAPABILITY"] = env_value
    code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip().lower()


def _runnable() -> list[str]:
    best = _capability(None)
    return list(ORDER[: ORDER.index(best) + 1]) if best in ORDER else [best]


RUNNABLE = _runnable()
THIS_PROCESS = os.environ.get("ATEN_CPU_CAPABILITY", "").lower() or RUNNABLE[-1]
COVERED: list[str] = []  # capabilities whose subprocess run passed, read by conftest's summary


@pytest.mark.parametrize("capability", [c for c in ORDER if c != THIS_PROCESS])
def test_quantised_layers_under_every_capability(capability):
    if capability not in RUNNABLE:
        pytest.skip(f"this CPU cannot run the {capability} kernels (best: {RUNNABLE[-1]})")
    assert _capability(capability) == capability  # the variable really switched the kernels
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "HF_HUB_OFFLINE": "1"}
    # fp16w runs on fbgemm, which picks its kernels from the CPU itself (or FBGEMM_ENABLE_INSTRUCTIONS), never from
    # ATEN_CPU_CAPABILITY: its tests (every id holding "fp16") would repeat this process's run, so they stay out
    run = subprocess.run([sys.executable, "-m", "pytest", str(HERE / "test_quant.py"), "-q", "-p", "no:cacheprovider",
                          "-x", "-k", "not fp16"], env=env, capture_output=True, text=True, cwd=HERE.parent)
    assert run.returncode == 0, f"tests/test_quant.py under ATEN_CPU_CAPABILITY={capability}:\n{run.stdout[-4000:]}"
    COVERED.append(capability)
