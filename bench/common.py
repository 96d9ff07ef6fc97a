"""Shared pieces of the benchmarks: the two contenders on identical weights, timing, reporting.

Every script compares mmadapter with the anchor — Hugging Face transformers + PEFT's
AdaptionPrompt — on the same base (the embedded SmolLM2-135M-Instruct, dequantised to the same
fp32 weights for both: transformers reads the same GGUF), the same adapter shape, in one process,
with the same thread count. Figures are medians of at least 5 runs after a warm-up.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"
BASE = "smollm2-135m-instruct"
K = 10  # adaptation prompts per layer, as the reference


def setup_threads(n: int | None = None) -> int:
    n = n or int(os.environ.get("BENCH_THREADS", 0)) or min(2, os.cpu_count() or 1)
    torch.set_num_threads(n)
    return n


def median_seconds(fn: Callable[[], Any], runs: int = 5, warmup: int = 1) -> tuple[float, list[float]]:
    """Median wall time of fn() over `runs` runs after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def ours(n_layers: int | None = None, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """The embedded base with a fresh K=10 adapter over its top n_layers (None: no adapter)."""
    from mmadapter import AdapterConfig, load_base

    model = load_base(BASE, dtype=dtype, device=device)
    if n_layers is not None:
        model.add_adapter(AdapterConfig(n_prompts=K, n_layers=n_layers), seed=0)
        with torch.no_grad():
            model.adapter.gates.fill_(0.1)  # open gates: the prompt term is computed, not skipped
    return model


def anchor(n_layers: int | None = None):
    """transformers' LlamaForCausalLM on the same GGUF (same fp32 weights), + PEFT AdaptionPrompt."""
    from transformers import AutoModelForCausalLM, logging as hf_logging

    from mmadapter.weights import embedded_path

    hf_logging.set_verbosity_error()
    path = embedded_path(BASE)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    model.requires_grad_(False)
    if n_layers is None:
        return model
    from peft import AdaptionPromptConfig, get_peft_model

    peft = get_peft_model(model, AdaptionPromptConfig(adapter_len=K, adapter_layers=n_layers, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if name.endswith("adaption_gate"):
                p.fill_(0.1)
    return peft


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"), "cpu_flags": cpu_flags()}


def cpu_flags() -> str:
    """The CPU features that decide which kernels are fast (absolute speeds differ between machines with and
    without AVX-512 / bf16 / AMX, so every report says which it ran on)."""
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    have = set(flags.split(":", 1)[1].split())
    return " ".join(f for f in wanted if f in have) or "none of " + " ".join(wanted)


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far.

    Linux's VmHWM, not getrusage: ru_maxrss survives exec, so a child started from the (large) benchmark
    process would report the parent's size at fork time.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 1024**2)


def print_peak(fn: Callable[[], Any], times: int) -> None:
    """Run fn `times` times, then print this process's peak memory as the line `peak_in_subprocess` reads."""
    for _ in range(times):
        fn()
    print(json.dumps({"peak_rss_mib": peak_rss_mib()}))


def peak_in_subprocess(module: str, *args: str) -> float:
    """Peak memory (MiB) of `python -m module args`, a fresh process whose peak is its own (`print_peak`)."""
    out = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, check=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mib"]


def section(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown heading and table."""
    def cell(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = [f"### {title}", "", "| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def sections(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]],
             tables: Sequence[dict[str, Any]] = ()) -> str:
    """A result's Markdown: its table, then the further tables (each a dict with a title, headers and rows)."""
    return "\n".join(section(t["title"], t["headers"], t["rows"])
                     for t in [{"title": title, "headers": headers, "rows": rows}, *tables])


def report(name: str, title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]],
           extra: dict[str, Any] | None = None, tables: Sequence[dict[str, Any]] = ()) -> str:
    """Print a Markdown table (and the further `tables`, each a title, headers and rows) and write
    bench/results/<name>.json; returns the Markdown."""
    RESULTS.mkdir(exist_ok=True)
    markdown = sections(title, headers, rows, tables)
    payload = {"title": title, "machine": machine(), "headers": list(headers), "rows": [list(r) for r in rows],
               **(extra or {}), **({"tables": list(tables)} if tables else {})}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=1, default=str))
    print(markdown, flush=True)
    return markdown


def markdown_of(name: str) -> str | None:
    """The table a previous run wrote to bench/results/<name>.json, or None."""
    path = RESULTS / f"{name}.json"
    if not path.exists():
        return None
    r = json.loads(path.read_text())
    markdown = sections(r["title"], r["headers"], r["rows"], r.get("tables", []))
    return f"{markdown}\n({r['machine']['cpu']}, {r['machine']['date']})\n"
