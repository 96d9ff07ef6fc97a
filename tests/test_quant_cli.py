"""The README's quantised-base commands through the CLI: `mmadapter chat --dtype int8|int4|fp16w` answers from a
quantised base, and `mmadapter info` reports the weight bytes one token reads for each --dtype."""

from __future__ import annotations

import json

import pytest
import torch
from interop_helpers import add_byte_tokenizer
from interop_helpers import one_thread  # noqa: F401  (autouse fixture: importing it applies it here)

import mmadapter.model
from mmadapter import load_base
from mmadapter.cli import main
from mmadapter.quant import Fp16Linear, Int4Linear, Int8Linear, bytes_per_token, kernels_available

pytestmark = pytest.mark.skipif(not kernels_available(torch.device("cpu")),
                                reason="this PyTorch build has no weight-only CPU kernels")
LAYERS = {"int8": Int8Linear, "int4": Int4Linear, "fp16w": Fp16Linear}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny HF Llama (GQA, widths a multiple of 32 so the 4-bit kernel takes every matrix), byte tokenizer."""
    from conftest import save_tiny_hf

    path = tmp_path_factory.mktemp("quant_cli_base")
    save_tiny_hf(path, seed=3, hidden_size=64, intermediate_size=128)
    add_byte_tokenizer(path)
    return path


@pytest.mark.parametrize("dtype", ["int8", "int4", "fp16w"])
def test_chat_dtype_answers_from_the_quantised_base(dtype, base, capsys, monkeypatch):
    loaded = []

    def recording(*args, **kwargs):
        loaded.append(load_base(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(mmadapter.model, "load_base", recording)  # what the chat command calls
    argv = ["chat", "--base", str(base), "--dtype", dtype, "--once", "Name a colour.", "--max-new-tokens", "6"]
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    (model,) = loaded
    linears = [m for m in model.base.layers.modules() if isinstance(m, tuple(LAYERS.values()))]
    assert linears and all(isinstance(m, LAYERS[dtype]) for m in linears)  # one kind in the layers (heads aside)
    assert not any(isinstance(m, torch.nn.Linear) for m in model.base.layers.modules())
    assert out == load_base(str(base), dtype=dtype).generate("Name a colour.", max_new_tokens=6) + "\n"


def test_info_reports_bytes_per_token_for_every_dtype(base, capsys):
    assert main(["info", str(base), "--json"]) == 0
    per_token = json.loads(capsys.readouterr().out)["decode_bytes_per_token"]
    config = load_base(str(base)).base.config
    assert per_token == {"float32": bytes_per_token(config, torch.float32),
                         "bfloat16": bytes_per_token(config, torch.bfloat16),
                         "int8": bytes_per_token(config, "int8"), "int4": bytes_per_token(config, "int4"),
                         "fp16w": bytes_per_token(config, "fp16w")}
    assert per_token["int4"] < per_token["int8"] < per_token["bfloat16"] == per_token["fp16w"] < per_token["float32"]
    assert main(["info", str(base)]) == 0
    assert "decode_bytes_per_token:" in capsys.readouterr().out  # the text form shows it too
