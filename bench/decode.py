"""Greedy decoding, a 32-token prompt -> 64 new tokens, at batch 1 and 8, against the hardware bound.

Contenders: transformers `generate` with and without a PEFT AdaptionPrompt adapter (K=10, L=30), and
mmadapter's decoder for the base, the adapter (K=10, L=30) and the multimodal adapter with an image
(the prompt K/V, image token included, is computed once per request; the tower runs per request here,
its features not cached). Tokens/s counts new tokens over the whole request, prefill included.
The bound: weight bytes read per token / measured memory-read bandwidth.
"""

from __future__ import annotations

import argparse

import torch

from mmadapter.generate import Sampling, decode_tokens

from .bandwidth import read_bandwidth
from .common import anchor, median_seconds, ours, print_peak, report, setup_threads

PROMPT, NEW = 32, 64


def prompts(batch: int, vocab: int) -> torch.Tensor:
    return torch.randint(100, vocab, (batch, PROMPT), generator=torch.Generator().manual_seed(batch))


def general_step(base):
    """The general `Llama.forward` over one token: the decode step before the lean one (`decode_step.DecodeStep`)."""
    def step(token, pos, cache, key_mask, adapter):
        h = base(token[:, None], input_pos=torch.tensor([pos]), cache=cache, key_mask=key_mask, adapter=adapter)
        return base.head(h[:, -1])

    return step


def ours_fn(model, batch: int, image: bool = False, step=None):
    """One request; `step()` gives the request's decode step (default: the lean eager one)."""
    tokens = prompts(batch, model.base.config.vocab_size).tolist()

    def go() -> None:
        feats, has = None, None
        if image:
            from PIL import Image

            model.feature_cache.clear()  # the tower runs for every request, as for a new image
            feats, has = model.image_features([Image.new("RGB", (224, 224), (200, 30, 30))] * batch)
        with torch.inference_mode():
            kv = model.adapter_kv(feats, has)
        for _ in decode_tokens(model.base, tokens, kv, Sampling(max_new_tokens=NEW), eos_ids=(),
                               step=step() if step else None):
            pass

    return go


def anchor_fn(model, batch: int):
    tokens = prompts(batch, model.config.vocab_size)
    mask = torch.ones_like(tokens)

    def go() -> None:
        with torch.inference_mode():
            model.generate(input_ids=tokens, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW,
                           do_sample=False, pad_token_id=0)

    return go


def weight_bytes(model) -> int:
    """Bytes of weights read per decoded token: every matrix once (a tied head reads the embedding)."""
    return sum(p.numel() * p.element_size() for p in model.base.parameters())


def tokens_per_s(fn, batch: int, runs: int) -> float:
    seconds, _ = median_seconds(fn, runs=runs)
    return NEW * batch / seconds


def run(runs: int = 5) -> str:
    bandwidth = read_bandwidth()
    rows = []
    hf = anchor()
    for b in (1, 8):
        rows.append(["transformers generate, base", b, round(tokens_per_s(anchor_fn(hf, b), b, runs), 1)])
    del hf
    hf = anchor(30)
    for b in (1, 8):
        rows.append(["transformers generate + PEFT adapter", b, round(tokens_per_s(anchor_fn(hf.base_model.model, b), b, runs), 1)])
    del hf
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = ours(30, dtype=dtype)
        bound = bandwidth / weight_bytes(model)
        name = "fp32" if dtype == torch.float32 else "bf16"
        for label, adapter in (("base", None), ("adapter", model.adapter)):
            for b in (1, 8) if dtype == torch.float32 else (1,):
                model.use_adapter(adapter)
                tps = tokens_per_s(ours_fn(model, b), b, runs)
                results[(name, label, b)] = tps
                share = f"{100 * tps / bound:.0f}% of {bound:.0f}" if b == 1 else ""
                rows.append([f"mmadapter {name}, {label}", b, round(tps, 1), share])
        if dtype == torch.float32:  # the same adapter decoding through the general forward, per token
            general = tokens_per_s(ours_fn(model, 1, step=lambda: general_step(model.base)), 1, runs)
            results[("fp32", "general", 1)] = general
            rows.append(["mmadapter fp32, adapter, general forward per token (before the lean step)", 1,
                         round(general, 1), f"{100 * general / bound:.0f}% of {bound:.0f}"])
            rows.append(["lean step / general forward, fp32 + adapter", 1,
                         f"{results[('fp32', 'adapter', 1)] / general:.2f}x", ""])
        del model
    from mmadapter import AdapterConfig, VisionConfig, build_model

    mm = build_model(ours(None), AdapterConfig(n_prompts=10, n_layers=30),
                     VisionConfig(model="ViT-B-32", pretrained=None), seed=0)
    rows.append(["mmadapter fp32, adapter + image (ViT-B-32 tower per request)", 1,
                 round(tokens_per_s(ours_fn(mm, 1, image=True), 1, runs), 1)])
    overhead = 100 * (results[("fp32", "base", 1)] / results[("fp32", "adapter", 1)] - 1)
    rows.append(["adapter overhead over the base, fp32", 1, f"{overhead:.1f}%", ""])
    rows = [r + [""] * (4 - len(r)) for r in rows]
    return report("decode", f"Greedy decoding, {PROMPT}-token prompt -> {NEW} new tokens (tokens/s, median of {runs}); "
                  f"memory read {bandwidth / 1e9:.1f} GB/s", ["decoder", "batch", "tokens/s", "share of the bandwidth bound"],
                  rows, {"bandwidth_bytes_per_s": bandwidth, "adapter_overhead_percent": overhead})


def compiled(runs: int = 5, budget_s: float = 600.0) -> str:
    """torch.compile of the one-token step (`--compile`): cold compile time (a fresh inductor cache) and
    tokens/s of the compiled step against the eager lean step, fp32 + adapter, batch 1, in one process."""
    import os
    import tempfile
    import time

    from mmadapter.compiled_step import BackgroundCompile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")  # cold
    model = ours(30)
    eager = tokens_per_s(ours_fn(model, 1), 1, runs)
    compiler = BackgroundCompile(model.base, budget_s=budget_s)
    start = time.perf_counter()
    ours_fn(model, 1, step=compiler.step)()  # starts the compile; this request decodes eagerly meanwhile
    first = time.perf_counter() - start
    while compiler.compiled is None and compiler.failure is None:
        time.sleep(0.1)
    rows = [["eager lean step", round(eager, 1), "", ""]]
    if compiler.failure:
        rows.append(["torch.compile (inductor)", "failed", compiler.failure[:120], ""])
    else:
        tps = tokens_per_s(ours_fn(model, 1, step=compiler.step), 1, runs)
        rows.append(["torch.compile (inductor, dynamic shapes)", round(tps, 1), f"{tps / eager:.2f}x",
                     f"{compiler.seconds:.0f} s; the first answer (eager, meanwhile) took {first:.1f} s"])
    return report("decode_compile", f"torch.compile of the decode step, fp32 + adapter, batch 1, {PROMPT} -> {NEW} "
                  f"tokens (median of {runs})", ["step", "tokens/s", "vs eager", "cold compile"], rows)


def peak(which: str) -> None:
    """One process decoding at batch 1 with the adapter: prints its peak resident memory."""
    setup_threads()
    if which == "ours":
        model = ours(30)
        fn = ours_fn(model, 1)
    else:
        fn = anchor_fn(anchor(30).base_model.model, 1)
    print_peak(fn, times=2)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--peak", choices=["ours", "anchor"])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="only the torch.compile table (minutes)")
    args = parser.parse_args()
    if args.peak:
        peak(args.peak)
    elif args.compile:
        setup_threads()
        compiled(args.runs)
    else:
        setup_threads()
        run(args.runs)
