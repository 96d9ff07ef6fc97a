"""Equal-work training step: a batch of 4 x 256 tokens, every token labelled, K=10, L=30 and L=8.

Both sides run forward, backward and an AdamW step on the adapter only. Every position carries a
label, so neither side can skip work: the difference is what each implementation wastes.
"""

from __future__ import annotations

import argparse

import torch

from .common import anchor, median_seconds, ours, print_peak, report, setup_threads

BATCH, SEQ = 4, 256


def batch(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(100, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


def ours_step(n_layers: int):
    model = ours(n_layers)
    tokens = batch(model.base.config.vocab_size)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.02)

    def step() -> None:
        model.loss(tokens, tokens).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def anchor_step(n_layers: int):
    model = anchor(n_layers)
    model.train()
    tokens = batch(model.config.vocab_size)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, betas=(0.9, 0.95),
                            weight_decay=0.02)

    def step() -> None:
        model(input_ids=tokens, labels=tokens).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def run(runs: int = 5) -> str:
    rows = []
    for n_layers in (30, 8):
        t_ours, _ = median_seconds(ours_step(n_layers), runs=runs)
        t_anchor, _ = median_seconds(anchor_step(n_layers), runs=runs)
        rows.append([f"K=10, L={n_layers}", round(t_anchor, 2), round(t_ours, 2), f"{t_anchor / t_ours:.2f}x"])
    return report("train_step", f"Train step, batch {BATCH} x {SEQ} tokens, all labelled (s/step, median of {runs})",
                  ["adapter", "transformers + PEFT", "mmadapter", "speed-up"], rows)


def peak(which: str, n_layers: int) -> None:
    """One process, three steps: prints its peak resident memory (for bench.memory)."""
    setup_threads()
    print_peak(ours_step(n_layers) if which == "ours" else anchor_step(n_layers), times=3)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--peak", choices=["ours", "anchor"])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    if args.peak:
        peak(args.peak, args.layers)
    else:
        setup_threads()
        run(args.runs)
