"""Test helpers shared by test_interop.py and test_cli.py: reference-format files built in the test."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mmadapter.config import LlamaConfig


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread; two threads on busy cores cost ~1 s per forward in spin-waits."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def v1_state(config: LlamaConfig, n_prompts: int, n_layers: int, *, scalar: bool = False, all_layers: bool = True,
             unused_gates_zero: bool = True, dtype: torch.dtype = torch.float16, seed: int = 0) -> dict:
    """Tensors named and shaped like the LLaMA-Adapter V1 release, for a base of `config`'s shape.

    The release stores every layer's gate; the bottom n_layers_base - L are unused (zero, never trained).
    """
    g = torch.Generator().manual_seed(seed)
    n, first = config.n_layers, config.n_layers - n_layers
    state = {"adapter_query.weight": torch.randn(n_layers * n_prompts, config.dim, generator=g).to(dtype)}
    shape = (1,) if scalar else (1, config.n_heads, 1, 1)
    for i in range(0 if all_layers else first, n):
        gate = torch.randn(shape, generator=g)
        if i < first and unused_gates_zero:
            gate = torch.zeros(shape)
        state[f"layers.{i}.attention.gate"] = gate.to(dtype)
    return state


def v1_reference_model(model, state: dict, n_prompts: int, n_layers: int) -> SimpleNamespace:
    """`model`'s base with prompts/gates taken from V1 tensors the way the official code reads them:
    adapter_query.weight.reshape(L, K, C)[i] and the gate of the i-th of the top L layers (a scalar gate
    broadcast over the heads), for `naive_reference_logits`."""
    c = model.base.config
    first = c.n_layers - n_layers
    prompts = state["adapter_query.weight"].float().reshape(n_layers, n_prompts, c.dim)
    gates = torch.stack([state[f"layers.{i}.attention.gate"].float().reshape(-1).expand(c.n_heads)
                         for i in range(first, c.n_layers)])
    return SimpleNamespace(base=model.base, adapter=SimpleNamespace(prompts=prompts, gates=gates, first_layer=first))


def add_byte_tokenizer(folder: Path, vocab_size: int = 256) -> None:
    """A byte-level tokenizer.json (3 specials + byte symbols, no merges) so a tiny model can chat."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = ["<unk>", "<s>", "</s>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())[: vocab_size - len(specials)]
    vocab = {token: i for i, token in enumerate(specials + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.add_special_tokens(specials)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}))


def random_gates(adapter, shared: bool, seed: int = 0) -> None:
    """Non-zero gates in (-1.5, 1.5): one value per layer (PEFT-exportable) or one per head."""
    g = torch.Generator().manual_seed(seed)
    n_layers, n_heads = adapter.gates.shape
    values = torch.rand(n_layers, 1 if shared else n_heads, generator=g) * 3 - 1.5
    with torch.no_grad():
        adapter.gates.copy_(values.expand(n_layers, n_heads))
