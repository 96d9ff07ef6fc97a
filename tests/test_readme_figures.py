"""Every measured figure the README quotes equals the committed result file it comes from.

Each entry of FIGURES rebuilds, from `bench/results/*.json` (written by `python -m bench`), the README
text that quotes a figure — a table row or a phrase — and the test looks for it in the README (whitespace
collapsed). A README figure that differs from its file, or a result file refreshed without the README, fails
here. Figures computed from configs (parameter counts, file sizes) are rebuilt from the configs, and stated
limits from the constants that set them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

import pytest

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def result(name: str) -> dict[str, Any]:
    return json.loads((RESULTS / f"{name}.json").read_text())


def row(name: str, first: str, batch: int | None = None) -> list[Any]:
    """The row of a result table whose first cell is `first` (and whose batch column is `batch`)."""
    rows = [r for r in result(name)["rows"] if r[0] == first and (batch is None or r[1] == batch)]
    assert len(rows) == 1, f"bench/results/{name}.json: no single row {first!r} (batch {batch})"
    return rows[0]


def mark(met: bool) -> str:
    """The README's mark for a target met or missed."""
    return "✓" if met else "✗"


def times(text: str) -> str:
    """The files write ratios as "1.30x"; the README as "1.30×"."""
    return text.replace("x", "×")


def signed(value: float) -> str:
    return f"{value:.1f}".replace("-", "−")  # the README's minus sign


def gbps(name: str) -> str:
    return f"{result(name)['bandwidth_bytes_per_s'] / 1e9:.1f}"


def date(name: str) -> str:
    return result(name)["machine"]["date"]


def decode(first: str, batch: int = 1) -> float:
    return row("decode", first, batch)[2]


def table() -> list[str]:
    """The Benchmarks table, row by row."""
    step = {r[0]: r for r in result("train_step")["rows"]}
    epoch = result("epoch")["rows"]
    prefix = result("prefix_cache")["rows"]
    memory = {r[0]: r for r in result("memory")["rows"]}
    hf, hf_base = decode("transformers generate + PEFT adapter"), decode("transformers generate, base")
    ours, ours_base = decode("mmadapter fp32, adapter"), decode("mmadapter fp32, base")
    hf8, ours8 = decode("transformers generate + PEFT adapter", 8), decode("mmadapter fp32, adapter", 8)
    fp32_share, fp32_bound = row("decode", "mmadapter fp32, adapter", 1)[3].split("% of ")
    bf16_share, bf16_bound = row("decode", "mmadapter bf16, base", 1)[3].split("% of ")
    return [
        f"| train step 4 × 256, all tokens labelled, L=30 | {step['K=10, L=30'][1]:.2f} s | {step['K=10, L=30'][2]:.2f} s"
        f" | **{times(step['K=10, L=30'][3])} faster** |",
        f"| the same, L=8 | {step['K=10, L=8'][1]:.2f} s | {step['K=10, L=8'][2]:.2f} s"
        f" | **{times(step['K=10, L=8'][3])} faster** |",
        f"| one epoch, Alpaca-like lengths, PEFT padded to 512 | {epoch[0][1]:.1f} s | {epoch[2][1]:.1f} s"
        f" | **{times(epoch[0][2])} faster** |",
        f"| the same, PEFT with dynamic padding | {epoch[1][1]:.1f} s | {epoch[2][1]:.1f} s"
        f" | **{times(epoch[1][2])} faster** |",
        f"| frozen-prefix cache (L=8): epochs 2–3 against epoch 1 | | {prefix[0][1]:.1f} → {prefix[1][1]:.1f} s"
        f" | **{times(prefix[1][2])}** |",
        f"| greedy decoding, batch 1, with the adapter ¹ | {hf:.1f} tok/s | {ours:.1f} tok/s | **{ours / hf:.2f}×** |",
        f"| greedy decoding, batch 1, base model ¹ | {hf_base:.1f} tok/s | {ours_base:.1f} tok/s"
        f" | {ours_base / hf_base:.2f}× |",
        f"| greedy decoding, batch 8, with the adapter ¹ | {hf8:.1f} tok/s | {ours8:.1f} tok/s | {ours8 / hf8:.2f}× |",
        f"| adapter overhead over the base, batch 1 ¹ | {(hf_base / hf - 1) * 100:.0f}%"
        f" | {signed(result('decode')['adapter_overhead_percent'])}% (noise) |",
        f"| fp32 decoding, share of the bandwidth bound ({fp32_bound} tok/s) ¹ | | {fp32_share}% |",
        f"| bf16 decoding, share of the bound ({bf16_bound} tok/s) ¹ | | {bf16_share}% |",
        f"| peak resident memory, training L=30 | {memory['train step, L=30'][1]} MiB"
        f" | {memory['train step, L=30'][2]} MiB | **{memory['train step, L=30'][3]}×** |",
        f"| peak resident memory, decoding batch 1 | {memory['decode, batch 1, L=30'][1]} MiB"
        f" | {memory['decode, batch 1, L=30'][2]} MiB | {memory['decode, batch 1, L=30'][3]}× |",
    ]


def benchmark_prose() -> list[str]:
    """Figures the Benchmarks text quotes from the same files."""
    hf, hf_base = decode("transformers generate + PEFT adapter"), decode("transformers generate, base")
    ours, ours8 = decode("mmadapter fp32, adapter"), decode("mmadapter fp32, adapter", 8)
    general = row("decode", "mmadapter fp32, adapter, general forward per token (before the lean step)", 1)
    lean = times(row("decode", "lean step / general forward, fp32 + adapter", 1)[2])
    compiled = {r[0]: r for r in result("decode_compile")["rows"]}
    cold, first_answer = re.fullmatch(r"(\d+) s; the first answer \(eager, meanwhile\) took ([\d.]+) s",
                                      compiled["torch.compile (inductor, dynamic shapes)"][3]).groups()
    matvec = {r[0]: r for r in result("matvec")["rows"]}
    head_saving = (float(matvec["thread split (ours)"][3].split()[0]) - float(matvec["oneDNN packed"][3].split()[0]))
    v2 = result("v2")
    bias, lora = v2["overhead_percent"]["V2 bias"], v2["overhead_percent"]["V2 bias + LoRA r16"]
    epoch_tokens = int(re.search(r"\((\d+) tokens\)", result("epoch")["title"]).group(1))
    weights_mb = re.search(r"\((\d+ MB) fp32", result("matvec")["title"]).group(1)
    return [
        f"Measured on {date('train_step')} on a 2-core AMD EPYC (no AVX-512), 2 threads, torch 2.14.1",
        f"the measured memory-read bandwidth was {gbps('bandwidth')} GB/s for `bench/results/bandwidth.json` and "
        f"{gbps('decode')} GB/s for `bench/results/decode.json`",
        f"¹ Decoding rows: re-measured on {date('decode')} (memory read {gbps('decode')} GB/s)",
        f"decodes the old step (the general forward per token) at {general[2]:.1f} tokens/s, so the lean step is "
        f"{lean} faster there",
        f"with an image (a random ViT-B-32 tower run per request) mmadapter decodes at "
        f"{decode('mmadapter fp32, adapter + image (ViT-B-32 tower per request)'):.1f} tokens/s",
        f"capped at 512; {epoch_tokens:,} tokens",
        f"**Prefix cache, {times(result('prefix_cache')['rows'][1][2])} of an ideal",
        f"one-row fp32 matrix-vector product on one core: {matvec['F.linear'][2]} of the {gbps('bandwidth')} GB/s",
        f"as a batched product: {matvec['thread split (ours)'][2]} over the whole model",
        f"{ours:.1f} against {general[2]:.1f} tokens/s with the adapter, **{lean}**, and fp32 decoding at "
        f"{row('decode', 'mmadapter fp32, adapter', 1)[3].split('%')[0]}% of the bandwidth bound instead of "
        f"{general[3].split('%')[0]}%",
        f"The adapter term costs {signed(result('decode')['adapter_overhead_percent'])}% over the base in the table, "
        f"that is nothing measurable (HF + PEFT: {(hf_base / hf - 1) * 100:.0f}%)",
        f"`python -m bench.decode --compile`, {date('decode_compile')}, `bench/results/decode_compile.json`) "
        f"took **{cold} s cold**",
        f"decoded at {compiled['torch.compile (inductor, dynamic shapes)'][1]:.1f} tokens/s against "
        f"{compiled['eager lean step'][1]:.1f} eager "
        f"({times(compiled['torch.compile (inductor, dynamic shapes)'][2])})",
        f"the request answered eagerly during the compile took {first_answer} s",
        f"({date('matvec')}, `bench/results/matvec.json`): `F.linear` {matvec['F.linear'][1]} "
        f"({matvec['F.linear'][2]}; MKL's sgemv uses one core), our thread split {matvec['thread split (ours)'][1]} "
        f"({matvec['thread split (ours)'][2]}), MKL's packed sgemm {matvec['MKL packed'][1]} "
        f"({matvec['MKL packed'][2]}), oneDNN's packed weights {matvec['oneDNN packed'][1]} "
        f"({matvec['oneDNN packed'][2]})",
        f"({float(matvec['oneDNN packed'][3].split()[0]):.1f} against "
        f"{float(matvec['thread split (ours)'][3].split()[0]):.1f} ms, {matvec['oneDNN packed'][4]}: the full read",
        f"for about {head_saving / (1000 / ours) * 100:.0f}% of a token's time",
        f"every weight of the model's shape ({weights_mb},",
        f"through the {head_mb()} MB head alone", f"a packed head would be a second {head_mb()} MB copy",
        f"(the table above: {ours8:.1f} tokens/s at batch 8 against {ours:.1f} at batch 1 with the adapter, "
        f"{ours8 / ours:.2f}×)",
        f"Measured {date('v2')} (2-core AMD EPYC; `bench/results/v2.json`): bias tuning costs "
        f"{bias:.1f}% over the base ({mark(bias <= 10)}), bias + LoRA r16 {lora:.1f}% ({mark(lora <= 25)}), "
        f"in a single run",
        f"a 135M base whose whole token takes {1000 / row('v2', 'mmadapter fp32, base', 1)[2]:.0f} ms",
    ]


def head_mb() -> str:
    """SmolLM2-135M's tied head in fp32, from its preset."""
    from mmadapter.config import LlamaConfig

    config = LlamaConfig.from_name("smollm2-135m")
    return f"{config.vocab_size * config.dim * 4 / 1e6:.0f}"


def serving() -> list[str]:
    rows = {r[0]: r for r in result("serving")["rows"]}
    out = []
    for name, label in (("one at a time", "one at a time (`--max-batch 0`)"),
                        ("continuous batching", "batching, whole prompts, no reuse (`--prefill-chunk 0 --reuse-mb 0`)"),
                        ("batching + chunked prefill + reuse", "batching + chunked prefill + reuse (the defaults)")):
        r = rows[name]
        out.append(f"| {label} | {r[1].replace('/', ' / ')} | {r[2]:.1f} s | {r[3]:.1f} s | {r[4]:.1f} | {r[5]:.1f} "
                   f"| {times(r[6])} | {times(r[10])} | {r[11]:.2f} → {r[12]:.2f} s ({times(r[13])}) | {r[8]} MiB |")
    return out + serving_profile()


def serving_profile() -> list[str]:
    """The batch engine's profile table of the same run, as bench/serving.py writes it."""
    from bench.common import section

    profile = result("serving")["tables"][0]
    return section(profile["title"], profile["headers"], profile["rows"]).splitlines()[2:]


def parameter_counts() -> list[str]:
    """The paper's LLaMA-7B count and the adapter file size, from the default configs."""
    import torch

    from mmadapter import AdapterConfig
    from mmadapter.adapter import Adapter
    from mmadapter.config import LlamaConfig

    with torch.device("meta"):
        adapter = Adapter(AdapterConfig(), LlamaConfig.from_name("llama-7b"))
    counts = adapter.parameter_counts()
    return [f"giving the paper's {counts['prompts']:,} + {counts['gates']:,} trainable parameters",
            f"About {counts['total'] * 4 / 2**20:.1f} MiB for K=10, L={adapter.n_layers} on a 7B base"]


def limits() -> list[str]:
    """Limits the README states, from the constants that set them."""
    import inspect

    from test_hostile_files import MEMORY_LIMIT_MIB, TIME_LIMIT_S

    from mmadapter.app.ui import UPLOAD_RELEASE_GRACE_S
    from mmadapter.compiled_step import BackgroundCompile
    from mmadapter.images import DEFAULT_MAX_PIXELS, MAX_ASPECT_RATIO

    budget = inspect.signature(BackgroundCompile.__init__).parameters["budget_s"].default
    return [f"over {DEFAULT_MAX_PIXELS // 10**6} megapixels (`max_image_pixels`)",
            f"a picture longer than {MAX_ASPECT_RATIO}:1 is *cropped* around its centre to {MAX_ASPECT_RATIO}:1",
            f"A released upload is now deleted {UPLOAD_RELEASE_GRACE_S:.0f} s later (`UPLOAD_RELEASE_GRACE_S`)",
            f"overruns its budget ({budget:.0f} s)",
            f"within {TIME_LIMIT_S:.0f} s and {MEMORY_LIMIT_MIB} MiB"]


def demo_tower_probe() -> list[str]:
    """The question-conditioned probe table of the shipped tower, as its own formatter writes it."""
    from mmadapter.demo.reader_probe import format_table

    return format_table(result("reader_probe_shipped")).split("\n\n")[0].splitlines()


def bench_table(name: str) -> list[str]:
    """A result file's table as the README quotes it: a caption line (what, machine, CPU flags, date), then
    the Markdown rows `bench.common.section` writes."""
    from bench.common import section

    r = result(name)
    m = r["machine"]
    caption = f"{r['title']}; {m['cpu']}, CPU flags: {m.get('cpu_flags') or 'none listed'}, {m['date']}:"
    return [caption] + section(r["title"], r["headers"], r["rows"]).splitlines()[2:]


def quantised() -> list[str]:
    return bench_table("quant_kernels") + bench_table("quant")


def demo_eval() -> list[str]:
    """The shipped demo's accuracy table, as `make demo-eval` prints it (bench/results/demo_eval.json)."""
    from mmadapter.demo.evaluate import format_table

    return [line for line in format_table(result("demo_eval")).splitlines() if line]


def demo_experiments() -> list[str]:
    """The learning-curve experiments' table (bench/results/demo_experiments/*.json)."""
    from mmadapter.demo.experiment import format_curves

    curves = {p.stem: json.loads(p.read_text()) for p in sorted((RESULTS / "demo_experiments").glob("*.json"))}
    assert curves, "no learning-curve results in bench/results/demo_experiments/"
    return format_curves(curves).splitlines()


def query_spread() -> list[str]:
    """How much the named colour moves each layer's query (bench/results/query_spread.json)."""
    from mmadapter.demo.query_spread import format_spread

    return format_spread(result("query_spread")).splitlines()


FIGURES: dict[str, Callable[[], list[str]]] = {
    "benchmarks table": table, "benchmarks text": benchmark_prose, "serving": serving,
    "parameter counts": parameter_counts, "limits": limits, "demo tower probe": demo_tower_probe,
    "demo accuracy": demo_eval, "demo learning curves": demo_experiments, "query spread": query_spread,
    "quantised": quantised,
}


def readme_text() -> str:
    return " ".join((REPO / "README.md").read_text().split())


@pytest.mark.parametrize("part", FIGURES)
def test_readme_quotes_the_result_files(part):
    text = readme_text()
    missing = [snippet for snippet in FIGURES[part]() if " ".join(snippet.split()) not in text]
    assert not missing, "README differs from the result files; expected, verbatim:\n" + "\n".join(missing)


def test_a_changed_result_fails(monkeypatch):
    """The mechanism itself: a result file that says something else than the README is caught."""
    original = result("v2")
    changed = {**original, "overhead_percent": {**original["overhead_percent"], "V2 bias": 12.34}}
    monkeypatch.setitem(globals(), "result", lambda name: changed if name == "v2" else original_result(name))
    assert any(" ".join(s.split()) not in readme_text() for s in benchmark_prose())


def original_result(name: str) -> dict[str, Any]:
    return json.loads((RESULTS / f"{name}.json").read_text())


def test_the_prefix_cache_ideal_is_the_arithmetic_of_its_tokens(smollm):
    """The README's FLOP estimate behind "an ideal 1.89×": the benchmark's 64 records through the embedded
    base's tokenizer and template, each layer's weights 2 FLOPs per token plus causal attention, the tied head
    forward and backward over the labelled tokens; 22 frozen and 8 adapted layers."""
    from bench.prefix_cache import records

    from mmadapter.data.encode import encode_dataset
    from mmadapter.data.records import read_records

    examples, _ = read_records(records(64), REPO)
    encoded, stats = encode_dataset(examples, smollm.tokenizer, smollm.template, 512, progress=False)
    c = smollm.base.config
    weights = c.dim * c.head_dim * (2 * c.n_heads + 2 * c.n_kv_heads) + 3 * c.dim * c.ffn_dim
    layer = round((2 * weights * stats.tokens + 2 * c.dim * sum(len(e) ** 2 for e in encoded)) / 1e9)
    head = round(4 * c.vocab_size * c.dim * stats.label_tokens / 1e9, -1)
    frozen = c.n_layers - 8
    first, later = frozen * layer + 8 * layer * 2 + head, 8 * layer * 2 + head
    snippets = [f"about {layer} GFLOP per layer forward ({stats.tokens:,} tokens), so epoch 1 is {frozen} × {layer} "
                f"(frozen) + 8 × {layer} × 2 (adapted, forward and backward) + {head:.0f} (the tied "
                f"{c.vocab_size // 1000}k-vocabulary head, forward and backward over {stats.label_tokens:,} labelled "
                f"tokens) ≈ {round(first, -1):,.0f} GFLOP, and a later epoch ≈ {round(later, -1):,.0f}: at most "
                f"{first / later:.2f}×",
                f"of an ideal {first / later:.2f}×**"]
    text = readme_text()
    missing = [s for s in snippets if " ".join(s.split()) not in text]
    assert not missing, "README differs from the recomputed estimate; expected, verbatim:\n" + "\n".join(missing)
