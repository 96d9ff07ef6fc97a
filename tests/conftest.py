"""Shared fixtures: a tiny random Llama saved in Hugging Face layout, and the embedded SmolLM2."""

from __future__ import annotations

import os
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def tiny_hf_config(**overrides):
    from transformers import LlamaConfig as HFLlamaConfig

    kw = dict(vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=160, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
              tie_word_embeddings=False, initializer_range=0.2, bos_token_id=1, eos_token_id=2)
    kw.update(overrides)
    return HFLlamaConfig(**kw)


def save_tiny_hf(path, seed: int = 0, **overrides):
    """A random tiny LlamaForCausalLM saved with save_pretrained (safetensors); returns the HF model."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_hf_config(**overrides)).eval()
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """(directory, transformers model) of a tiny GQA Llama in HF layout."""
    path = tmp_path_factory.mktemp("tiny_hf")
    return path, save_tiny_hf(path)


@pytest.fixture(scope="session")
def smollm():
    """The embedded SmolLM2-135M-Instruct as an MMAdapter without adapter (loaded once per session)."""
    from mmadapter import load_base

    return load_base("smollm2-135m-instruct")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Which CPU kernel families the quantised tests ran under (tests/test_quant_capabilities.py)."""
    module = sys.modules.get("test_quant_capabilities")
    if module is not None and module.COVERED:
        here = f" and {module.THIS_PROCESS} (this process)" if "test_quant" in sys.modules else ""
        terminalreporter.write_line(f"quantised tests passed under ATEN_CPU_CAPABILITY: {', '.join(module.COVERED)} "
                                    f"(subprocesses){here}; this CPU runs: {', '.join(module.RUNNABLE)}")
