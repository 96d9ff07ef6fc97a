"""The weight-only quantised base (int8, 4-bit, fp16 weights) against fp32, and llama.cpp on the same GGUF.

Decoding: greedy, a 32-token prompt -> 64 new tokens, batch 1, base and adapter (K=10, L=30), tokens/s over
the whole request, with each dtype's share of its bandwidth bound (`quant.bytes_per_token` ÷ measured read
bandwidth). llama.cpp (`llama-cpp-python`, the optional extra `bench`) decodes the same embedded Q4_1 GGUF
with the same prompt tokens and threads; a visible note replaces it when it is not installed.
Quality: max |Δlogit| vs fp32 on a real prompt, and how many of 50 prompts get the same first 16 greedy
tokens. Training: one 4 × 256 step at L=30 over each base, and the base's weight bytes. Memory: peak
resident memory of a fresh process that loads the base and decodes, per dtype.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from mmadapter.generate import Sampling, decode_tokens
from mmadapter.quant import SCHEMES, bytes_per_token

from .bandwidth import read_bandwidth
from .common import BASE, median_seconds, ours, peak_in_subprocess, print_peak, report, setup_threads
from .decode import NEW, PROMPT, ours_fn, prompts

DTYPES = {"fp32": torch.float32, **{scheme: scheme for scheme in SCHEMES}}
QUESTIONS = [f"{verb} {topic}." for verb in ("Explain", "Describe", "Give three facts about", "Write a sentence about",
                                             "What is the history of")
             for topic in ("the moon", "photosynthesis", "the French revolution", "prime numbers", "volcanoes",
                           "the piano", "honey bees", "the Pacific Ocean", "bicycles", "coffee")]  # 50 prompts


def llama_cpp_tokens_per_s(runs: int) -> tuple[float | None, str]:
    """llama.cpp's greedy tokens/s on the embedded GGUF (batch 1, same prompt tokens and threads)."""
    try:
        from llama_cpp import Llama
    except ImportError:
        note = "skipped: llama-cpp-python not installed (pip install .[bench]; it builds from source, ~12+ min)"
        print(f"llama.cpp anchor {note}", flush=True)
        return None, note
    from mmadapter.weights import embedded_path

    llm = Llama(model_path=str(embedded_path(BASE)), n_ctx=256, n_threads=torch.get_num_threads(),
                n_threads_batch=torch.get_num_threads(), verbose=False)
    tokens = prompts(1, 49152)[0].tolist()

    def go() -> None:
        llm.reset()
        for i, _ in enumerate(llm.generate(tokens, temp=0.0, reset=True)):
            if i + 1 == NEW:
                break

    seconds, _ = median_seconds(go, runs=runs)
    return NEW / seconds, "llama-cpp-python, Q4_1 GGUF as shipped"


def agreement(models: dict, n_tokens: int = 16) -> dict[str, tuple[int, float]]:
    """Per dtype: prompts (of 50) whose first n_tokens greedy tokens equal fp32's, and max |Δlogit| vs fp32 on
    the last position of a real prompt."""
    ids = {name: [m.prompt_ids(q) for q in QUESTIONS] for name, m in models.items()}
    answers, logits = {}, {}
    for name, m in models.items():
        steps = list(decode_tokens(m.base, ids[name], None, Sampling(max_new_tokens=n_tokens), eos_ids=()))
        answers[name] = torch.stack(steps, 1)  # [50, n_tokens]
        with torch.inference_mode():
            logits[name] = m.base.head(m.base(torch.tensor([ids[name][0]])))[0, -1]
    return {name: (int((answers[name] == answers["fp32"]).all(1).sum()),
                   float((logits[name] - logits["fp32"]).abs().max())) for name in models}


def weight_error(reference, quantised) -> float:
    """Median over the quantised linears of ||Q(W) - W|| / ||W||, W the reference model's weight."""
    dense = dict(reference.base.named_modules())
    errors = [float((m.dense_weight() - dense[n].weight.float()).norm() / dense[n].weight.float().norm())
              for n, m in quantised.base.named_modules() if hasattr(m, "dense_weight") and n in dense]
    return statistics.median(errors)


def train_step_seconds(model, runs: int) -> float:
    tokens = torch.randint(100, 49152, (4, 256), generator=torch.Generator().manual_seed(0))

    def go() -> None:
        model.loss(tokens, tokens).backward()
        for p in model.trainable_parameters():
            p.grad = None

    return median_seconds(go, runs=runs)[0]


def base_weight_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.base.parameters(), *model.base.buffers()])


def run(runs: int = 5) -> str:
    bandwidth = read_bandwidth()
    rows, decode, models = [], {}, {}
    for name, dtype in DTYPES.items():
        model = ours(30, dtype=dtype)
        models[name] = model
        bound = bandwidth / bytes_per_token(model.base.config, dtype)
        for label, adapter in (("base", None), ("adapter", model.adapter)):
            model.use_adapter(adapter)
            tps = NEW / median_seconds(ours_fn(model, 1), runs=runs)[0]
            decode[(name, label)] = tps
            rows.append([f"mmadapter {name}, {label}", round(tps, 1),
                         f"{tps / decode[('fp32', label)]:.2f}x", f"{100 * tps / bound:.0f}% of {bound:.0f}"])
    cpp, note = llama_cpp_tokens_per_s(runs)
    best = max(decode.values())
    rows.append([f"llama.cpp, base ({note})", round(cpp, 1) if cpp else "skipped",
                 f"{cpp / decode[('fp32', 'base')]:.2f}x" if cpp else "", ""])
    if cpp:
        rows.append(["best mmadapter / llama.cpp", "", f"{best / cpp:.2f}x", ""])
    for name in DTYPES:
        overhead = 100 * (decode[(name, "base")] / decode[(name, "adapter")] - 1)
        rows.append([f"adapter overhead over the base, {name}", f"{overhead:.1f}%", "", ""])
    # bf16 weights and activations: how often greedy text flips on rounding alone (a scale for the others)
    for name, (same, dlogit) in agreement({**models, "bf16": ours(30, dtype=torch.bfloat16)}).items():
        if name != "fp32":
            rows.append([f"{name}: max |Δlogit| vs fp32; same first 16 greedy tokens", f"{dlogit:.3f}",
                         f"{same}/50", ""])
    for name in SCHEMES:
        rows.append([f"{name}: median relative weight error vs the fp32 base", f"{weight_error(models['fp32'], models[name]):.4f}",
                     "", ""])
    times = {}
    for name in ("fp32", "int8"):
        model = models[name]
        times[name] = train_step_seconds(model, runs)
        rows.append([f"train step 4x256, L=30, {name} base: seconds; base weight MiB",
                     f"{times[name]:.2f}", f"{base_weight_bytes(model) / 2**20:.0f} MiB", ""])
    rows.append(["train step int8 / fp32", f"{times['int8'] / times['fp32']:.2f}x", "", ""])
    del models
    peaks = {name: peak_in_subprocess("bench.quant", "--peak", name) for name in ("fp32", "int4")}
    rows.append(["peak resident memory, load + decode batch 1: fp32 / 4-bit", f"{peaks['fp32']:.0f} MiB",
                 f"{peaks['int4']:.0f} MiB", f"{peaks['int4'] / peaks['fp32']:.2f}x"])
    return report("quant", f"Quantised base, batch 1, {PROMPT}-token prompt -> {NEW} new tokens (median of {runs}); "
                  f"memory read {bandwidth / 1e9:.1f} GB/s", ["what", "value", "ratio", "share of the bound"], rows,
                  {"decode": {f"{k[0]} {k[1]}": v for k, v in decode.items()}, "llama_cpp": cpp})


def peak(name: str) -> None:
    """One fresh process loading the base in this dtype and decoding: prints its peak resident memory."""
    model = ours(30, dtype=DTYPES[name])
    print_peak(ours_fn(model, 1), times=2)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--peak", choices=sorted(DTYPES))
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    setup_threads()
    if args.peak:
        peak(args.peak)
    else:
        run(args.runs)
