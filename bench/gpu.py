"""GPU check: a LLaMA-7B-shaped model with random bf16 weights (no download), K=10, L=30.

Decoding: tokens/s at batch 1 against the HBM bound (weight bytes / measured device bandwidth).
Training: batch 8 x 512 (or the context, if shorter), every token labelled; model-FLOPs utilisation
against the card's dense bf16 peak (forward 2N FLOPs per token; backward through the 30 adapted layers
~2N x 30/32 for activation gradients only — the base is frozen, so no weight gradients). Not yet
measured on a GPU. Run: `python -m bench --device cuda`; `run("cpu", preset="tiny")` checks the
script itself on a CPU.
"""

from __future__ import annotations

import time

import torch

from .common import report

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def device_bandwidth(device: str, numel: int) -> float:
    x = torch.ones(numel, dtype=torch.bfloat16, device=device)
    x.sum()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(10):
        x.sum()
    synchronize(device)
    return 10 * x.numel() * 2 / (time.perf_counter() - start)


def timed(fn, runs: int, device: str) -> float:
    fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(runs):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / runs


def run(device: str = "cuda", preset: str = "llama-7b") -> str:
    from mmadapter import AdapterConfig, load_base
    from mmadapter.generate import Sampling, decode_tokens

    kind = torch.device(device).type
    name = torch.cuda.get_device_name(device) if kind == "cuda" else "CPU"
    model = load_base(preset, dtype=torch.bfloat16, device=device)
    layers = model.base.config.n_layers
    model.add_adapter(AdapterConfig(n_prompts=10, n_layers=layers - 2), seed=0)
    with torch.no_grad():
        model.adapter.gates.fill_(0.1)
    n_params = sum(p.numel() for p in model.base.parameters())
    bandwidth = device_bandwidth(device, 2**30 if kind == "cuda" else 2**24)  # 2 GiB on a GPU
    bound = bandwidth / (n_params * 2)
    rows = []

    prompt = [[(1000 + i) % model.base.config.vocab_size for i in range(32)]]
    for label, adapter in (("base", None), (f"adapter K=10, L={layers - 2}", model.adapter)):
        def decode(adapter=adapter) -> None:
            with torch.inference_mode():
                kv = model.adapter_kv(adapter=adapter)
            for _ in decode_tokens(model.base, prompt, kv, Sampling(max_new_tokens=128), eos_ids=()):
                pass
        tps = 128 / timed(decode, runs=3, device=device)
        rows.append([f"decode batch 1, {label}", f"{tps:.1f} tokens/s", f"{100 * tps / bound:.0f}% of {bound:.0f}"])

    length = min(512, model.base.config.max_seq_len)
    tokens = torch.randint(0, model.base.config.vocab_size, (8, length), device=device)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)

    def step() -> None:
        with torch.autocast(kind, dtype=torch.bfloat16):
            loss = model.loss(tokens, tokens)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds = timed(step, runs=5, device=device)
    flops = tokens.numel() * (2 * n_params + 2 * n_params * (layers - 2) / layers)
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    mfu = f"{100 * flops / seconds / (peak * 1e12):.0f}% of {peak:.0f} TFLOP/s" if peak else "peak unknown"
    rows.append([f"train step 8 x {length}", f"{seconds:.3f} s ({tokens.numel() / seconds:.0f} tokens/s)", f"MFU {mfu}"])
    return report("gpu", f"{name}: {preset} shape, random bf16 weights; HBM read {bandwidth / 1e12:.2f} TB/s",
                  ["workload", "result", "against the hardware"], rows, {"device": name})
