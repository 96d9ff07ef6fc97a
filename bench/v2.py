"""LLaMA-Adapter V2 decoding cost: greedy batch-1 decoding with a V2 adapter against the bare base.

The embedded SmolLM2-135M with V2-shaped adapters over the top n_layers - 1 layers: K=10 prompts plus
10 image tokens (the visual-query output for a random image, computed once per request as in serving),
bias tuning (biases on wq/wo/w1/w2/w3, tuned norms) and bias + LoRA rank 16 on all seven projections,
every term non-zero so that nothing is skipped. Same 32-token prompt -> 64 new tokens as bench/decode.py.
"""

from __future__ import annotations

import torch

from mmadapter.generate import Sampling, decode_tokens

from .common import median_seconds, ours, report
from .decode import NEW, PROMPT, prompts


def v2_adapter(model, lora_rank: int):
    from mmadapter.adapter import Adapter
    from mmadapter.config import AdapterConfig, VisionConfig

    base = model.base.config
    config = AdapterConfig(n_prompts=10, n_layers=base.n_layers - 1, bias_tuning=True, lora_rank=lora_rank,
                           new_gate=lora_rank > 0)
    vision = VisionConfig(projector="visual-query", clip_dim=64, query_width=64, query_depth=2, query_heads=4)
    torch.manual_seed(0)
    adapter = Adapter(config, base, vision, feature_dim=17 * 64)
    with torch.no_grad():
        adapter.gates.fill_(0.1)
        for name, p in adapter.tuning.named_parameters():
            if ".bias." in name or ".lora_b." in name:
                p.normal_(0, 1e-3)  # non-zero: the tuned terms are computed
    return adapter


def request_fn(model, with_image: bool):
    """One request: the visual query and the prompt K/V once, then greedy decoding."""
    tokens = prompts(1, model.base.config.vocab_size).tolist()
    # random CLIP tokens stand in for the tower, whose per-request cost bench/decode.py's image row measures
    features = torch.randn(1, 17 * 64, generator=torch.Generator().manual_seed(0)) if with_image else None
    has_image = torch.ones(1, dtype=torch.bool) if with_image else None

    def go() -> None:
        with torch.inference_mode():
            kv = model.adapter_kv(features, has_image)
        for _ in decode_tokens(model.base, tokens, kv, Sampling(max_new_tokens=NEW), eos_ids=()):
            pass

    return go


def run(runs: int = 5) -> str:
    model = ours(None)
    rows, results = [], {}
    for label, adapter in (("base", None), ("V2 bias", v2_adapter(model, 0)),
                           ("V2 bias + LoRA r16", v2_adapter(model, 16))):
        model.use_adapter(adapter)
        seconds, _ = median_seconds(request_fn(model, with_image=adapter is not None), runs=runs)
        results[label] = NEW / seconds
    for label, tps in results.items():
        overhead = "" if label == "base" else f"{100 * (results['base'] / tps - 1):+.1f}%"
        rows.append([f"mmadapter fp32, {label}", 1, round(tps, 1), overhead])
    return report("v2", f"LLaMA-Adapter V2 decoding, {PROMPT}-token prompt -> {NEW} new tokens, batch 1 (tokens/s, "
                  f"median of {runs})", ["decoder", "batch", "tokens/s", "cost over the base"], rows,
                  {"overhead_percent": {k: 100 * (results["base"] / v - 1) for k, v in results.items() if k != "base"}})
