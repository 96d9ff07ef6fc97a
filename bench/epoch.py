"""One epoch of instruction tuning on a realistic length distribution, K=10, L=30.

The synthetic data mimics Alpaca with SmolLM2's tokenizer: a 41-token template preamble; an
instruction of lognormal length (median 18 tokens, sigma 0.6); an input in 40% of samples (median 25,
sigma 0.9); a response of lognormal length (median 60, sigma 0.9); sequences capped at 512 tokens. Only
response tokens carry a loss. Contenders:
- mmadapter: length-grouped batches, padding to the longest sample in each batch, the LM head only
  at labelled positions (what `mmadapter train` does);
- transformers + PEFT padded to 512, as the reference LLaMA-Adapter code does;
- transformers + PEFT with dynamic padding (random batches padded to their longest sample).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from mmadapter.data.encode import LengthGroupedBatchSampler

from .common import anchor, median_seconds, ours, report, setup_threads

N_SAMPLES, BATCH, MAX_LEN, PAD = 24, 4, 512, 2


def synthetic_lengths(n: int, seed: int = 0) -> list[tuple[int, int]]:
    """(prompt tokens, response tokens) per sample, Alpaca-like (see the module docstring)."""
    rng = np.random.default_rng(seed)
    instruction = np.exp(rng.normal(np.log(18), 0.6, n))
    has_input = rng.random(n) < 0.4
    inputs = np.exp(rng.normal(np.log(25), 0.9, n)) * has_input
    response = np.exp(rng.normal(np.log(60), 0.9, n))
    out = []
    for i in range(n):
        prompt = int(41 + instruction[i] + inputs[i] + (8 if has_input[i] else 0))
        resp = max(1, min(int(response[i]), MAX_LEN - prompt))
        out.append((min(prompt, MAX_LEN - 1), resp))
    return out


def samples(vocab: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(tokens, labels) per sample: labels are -100 on the prompt."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for prompt, resp in synthetic_lengths(N_SAMPLES, seed):
        tokens = torch.randint(100, vocab, (prompt + resp,), generator=g)
        labels = tokens.clone()
        labels[:prompt] = -100
        out.append((tokens, labels))
    return out


def pad(batch: list[tuple[torch.Tensor, torch.Tensor]], length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    tokens = torch.full((len(batch), length), PAD)
    labels = torch.full((len(batch), length), -100)
    mask = torch.zeros(len(batch), length, dtype=torch.long)
    for i, (t, lab) in enumerate(batch):
        tokens[i, : len(t)], labels[i, : len(t)], mask[i, : len(t)] = t, lab, 1
    return tokens, labels, mask


def ours_epoch():
    model = ours(30)
    data = samples(model.base.config.vocab_size)
    sampler = LengthGroupedBatchSampler([len(t) for t, _ in data], BATCH, seed=0)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.02)

    def epoch(limit: int | None = None) -> None:
        for indices in sampler.batches(0)[:limit]:
            group = [data[i] for i in indices]
            tokens, labels, _ = pad(group, max(len(t) for t, _ in group))
            model.loss(tokens, labels).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    return epoch, data


def anchor_epoch(dynamic: bool):
    model = anchor(30)
    model.train()
    data = samples(model.config.vocab_size)
    order = np.random.default_rng(0).permutation(len(data))
    batches = [order[i:i + BATCH] for i in range(0, len(order), BATCH)]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, betas=(0.9, 0.95),
                            weight_decay=0.02)

    def epoch(limit: int | None = None) -> None:
        for indices in batches[:limit]:
            group = [data[i] for i in indices]
            tokens, labels, mask = pad(group, max(len(t) for t, _ in group) if dynamic else MAX_LEN)
            model(input_ids=tokens, attention_mask=mask, labels=labels).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    return epoch


def timed(epoch, runs: int) -> float:
    """Median epoch time after a one-batch warm-up (a whole warm-up epoch of the padded anchor takes minutes)."""
    epoch(limit=1)
    return median_seconds(epoch, runs=runs, warmup=0)[0]


def run(runs: int = 5) -> str:
    ours_fn, data = ours_epoch()
    t_ours = timed(ours_fn, runs)
    t_dyn = timed(anchor_epoch(dynamic=True), runs)
    t_512 = timed(anchor_epoch(dynamic=False), runs)
    tokens = sum(len(t) for t, _ in data)
    rows = [["transformers + PEFT, padded to 512", round(t_512, 1), f"{t_512 / t_ours:.2f}x"],
            ["transformers + PEFT, dynamic padding", round(t_dyn, 1), f"{t_dyn / t_ours:.2f}x"],
            ["mmadapter (length-grouped, labelled positions only)", round(t_ours, 1), "1.00x"]]
    return report("epoch", f"One epoch: {N_SAMPLES} Alpaca-like samples ({tokens} tokens), batch {BATCH}, K=10, "
                  f"L=30 (s/epoch, median of {runs})", ["contender", "s/epoch", "mmadapter is faster by"], rows,
                  {"lengths": synthetic_lengths(N_SAMPLES)})


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    setup_threads()
    run(parser.parse_args().runs)
