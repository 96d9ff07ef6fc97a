"""Interop: LLaMA-Adapter V1 import against the reference forward, PEFT parity with peft itself, AdapterSet."""

from __future__ import annotations

import json

import pytest
import torch
from interop_helpers import add_byte_tokenizer, random_gates, v1_reference_model, v1_state
from interop_helpers import one_thread  # noqa: F401  (autouse fixture: importing it applies it here)
from test_adapter import naive_reference_logits

from mmadapter import AdapterConfig, LlamaConfig, VisionConfig, load_base
from mmadapter.adapter import Adapter
from mmadapter.adapter_file import load_adapter, save_adapter
from mmadapter.adapter_set import NO_ADAPTER, AdapterSet
from mmadapter.interop import (InteropError, adapter_to_peft, detect_format, load_peft, load_v1, peft_to_adapter,
                               read_peft, save_peft, v1_shape)


def _tokens(b=2, t=12, seed=0):
    return torch.randint(3, 256, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """{"MHA": dir, "GQA": dir} of tiny HF Llamas (4 layers, 4 heads; 4 or 2 kv heads)."""
    from conftest import save_tiny_hf

    out = {}
    for name, n_kv in (("MHA", 4), ("GQA", 2)):
        path = tmp_path_factory.mktemp(f"base_{name}")
        save_tiny_hf(path, seed=3, num_key_value_heads=n_kv)
        out[name] = path
    return out


# ----------------------------------------------------------------------------------------------
# LLaMA-Adapter V1


V1_CASES = {  # base, K, L, file variant, overrides
    "per-head release layout, K,L from the non-zero gates": ("MHA", 5, 3, dict(), {}),
    "per-head, GQA base, official K=10": ("GQA", 10, 2, dict(), {}),
    "scalar gates of the top layers only": ("GQA", 4, 3, dict(scalar=True, all_layers=False), {}),
    "scalar gates, trained-looking unused gates, K given": ("MHA", 3, 2, dict(scalar=True, unused_gates_zero=False),
                                                           {"n_prompts": 3}),
}


@pytest.mark.parametrize("case", V1_CASES)
def test_v1_import_matches_reference_forward(bases, tmp_path, case):
    base, k, n, variant, overrides = V1_CASES[case]
    model = load_base(str(bases[base]))
    state = v1_state(model.base.config, k, n, **variant)
    torch.save(state, tmp_path / "adapter.pth")
    assert detect_format(tmp_path / "adapter.pth") == "v1"

    adapter = load_v1(model, tmp_path / "adapter.pth", **overrides)
    assert (adapter.config.n_prompts, adapter.n_layers, adapter.template) == (k, n, "alpaca")
    tokens = _tokens()
    with torch.no_grad():
        ours = model(tokens, adapter=adapter)
    ref = naive_reference_logits(v1_reference_model(model, state, k, n), tokens).float()
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    assert (ours - model(tokens, adapter=None)).abs().max() > 1e-3  # the adapter does something


def test_v1_shape_of_the_release_layout():
    """adapter_query [300, C], gates for all 32 layers with layers 0-1 zero -> K=10, L=30 (the release)."""
    config = LlamaConfig(dim=8, n_layers=32, n_heads=2, n_kv_heads=2)
    state = v1_state(config, 10, 30)
    assert v1_shape(state, 32)[:2] == (10, 30)
    untrained = {k: torch.zeros_like(v) if k.endswith("gate") else v for k, v in state.items()}
    assert v1_shape(untrained, 32)[:2] == (10, 30)  # the official K=10
    assert v1_shape(state, 32, n_layers=20)[:2] == (15, 20)
    with pytest.raises(InteropError, match="K=7 does not divide"):
        v1_shape(state, 32, n_prompts=7)


def test_v1_errors(bases, tmp_path):
    model = load_base(str(bases["MHA"]))
    wide = v1_state(LlamaConfig(dim=128, n_layers=4, n_heads=4, n_kv_heads=4), 2, 2)
    torch.save(wide, tmp_path / "wide.pth")
    with pytest.raises(InteropError, match="dim 64"):
        load_v1(model, tmp_path / "wide.pth")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(InteropError, match="not a LLaMA-Adapter V1"):
        load_v1(model, tmp_path / "other.pth")
    torch.save({"adapter_query.weight": torch.zeros(4, 64), "extra": _NotATensor()}, tmp_path / "pickle.pth")
    with pytest.raises(InteropError, match="nothing is unpickled"):
        load_v1(model, tmp_path / "pickle.pth")


class _NotATensor:
    pass


# ----------------------------------------------------------------------------------------------
# PEFT AdaptionPrompt


def _peft_model(base_dir, adapter_len, adapter_layers, gates, seed=0):
    from peft import AdaptionPromptConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    hf = LlamaForCausalLM.from_pretrained(base_dir).eval()
    peft_model = get_peft_model(hf, AdaptionPromptConfig(adapter_len=adapter_len, adapter_layers=adapter_layers,
                                                         task_type="CAUSAL_LM"))
    with torch.no_grad():
        attns = [m for m in peft_model.modules() if hasattr(m, "adaption_gate")]
        for attn, gate in zip(attns, gates, strict=True):
            attn.adaption_gate.fill_(gate)
    return peft_model.eval()


@pytest.mark.parametrize("base", ["MHA", "GQA"])
def test_peft_adapter_from_peft_matches_transformers(bases, tmp_path, base):
    peft_model = _peft_model(bases[base], adapter_len=3, adapter_layers=3, gates=[0.3, -0.6, 0.9])
    peft_model.save_pretrained(tmp_path / "peft")
    tokens = _tokens()
    with torch.no_grad():
        ref = peft_model(tokens).logits

    model = load_base(str(bases[base]))
    assert detect_format(tmp_path / "peft") == "peft"
    adapter = load_peft(model, tmp_path / "peft")
    assert (adapter.config.n_prompts, adapter.n_layers) == (3, 3)
    with torch.no_grad():
        ours = model(tokens, adapter=adapter)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert (ours - model(tokens, adapter=None)).abs().max() > 1e-3


def test_export_to_peft_loads_in_peft_with_equal_logits(bases, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = load_base(str(bases["GQA"]))
    adapter = model.add_adapter(AdapterConfig(n_prompts=4, n_layers=2), seed=1)
    random_gates(adapter, shared=True)
    save_peft(adapter, tmp_path / "peft", base_name="tiny")
    hf = LlamaForCausalLM.from_pretrained(bases["GQA"]).eval()
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "peft").eval()
    tokens = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), peft_model(tokens).logits, atol=1e-5, rtol=1e-5)


def test_round_trips(bases):
    model = load_base(str(bases["MHA"]))
    ours = model.add_adapter(AdapterConfig(n_prompts=3, n_layers=3), seed=2)
    random_gates(ours, shared=True)
    config, tensors = adapter_to_peft(ours)
    back = peft_to_adapter(config, tensors, model.base.config)
    assert torch.equal(back.prompts, ours.prompts)
    assert back.config.gate == "per-layer"  # PEFT's layout: one gate per layer
    torch.testing.assert_close(back.gates.expand_as(ours.gates), ours.gates, atol=0, rtol=2e-6)  # atanh(tanh(g))
    tokens = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, adapter=back), model(tokens, adapter=ours), atol=1e-6, rtol=1e-6)
    # PEFT -> ours -> PEFT reproduces every tensor bit for bit
    _, again = adapter_to_peft(back)
    assert again.keys() == tensors.keys() and all(torch.equal(again[k], tensors[k]) for k in tensors)


def test_peft_gates_outside_tanh_range_are_refused(bases):
    config = load_base(str(bases["MHA"])).base.config
    adapter = Adapter(AdapterConfig(n_prompts=2, n_layers=2), config)
    peft_config, tensors = adapter_to_peft(adapter)
    for bad in (1.0, -1.5):
        tensors["base_model.model.model.layers.3.self_attn.adaption_gate"] = torch.tensor([bad])
        with pytest.raises(InteropError, match=r"\|a\| >= 1.*cannot be represented.*Nothing was clipped"):
            peft_to_adapter(peft_config, tensors, config)


@pytest.mark.parametrize("gate", ["per-layer", "per-head"])
def test_trained_adapter_exports_to_peft_with_one_gate_per_layer(bases, tmp_path, gate):
    """After a training step per-head gates differ (no PEFT equivalent); per-layer gates export, equal in PEFT."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from mmadapter.cli import main

    model = load_base(str(bases["GQA"]))
    adapter = model.add_adapter(AdapterConfig(n_prompts=4, n_layers=2, gate=gate), seed=1)
    assert adapter.gates.shape == (2, 1 if gate == "per-layer" else 4)
    tokens = _tokens()
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=1.0)
    for _ in range(2):  # step 1 moves the gates only, step 2 the prompts too
        model.loss(tokens, tokens).backward()
        optimizer.step()
        optimizer.zero_grad()
    save_adapter(model, tmp_path / "mine.safetensors")
    argv = [str(tmp_path / "mine.safetensors"), str(tmp_path / "peft"), "--to", "peft"]
    if gate == "per-head":
        with pytest.raises(InteropError, match="different gates per head.*--gate per-layer"):
            adapter_to_peft(adapter)
        assert main(["convert", *argv]) == 2
        return
    assert main(["convert", *argv]) == 0
    hf = LlamaForCausalLM.from_pretrained(bases["GQA"]).eval()
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "peft").eval()
    with torch.no_grad():
        ours = model(tokens)
        torch.testing.assert_close(ours, peft_model(tokens).logits, atol=1e-5, rtol=1e-5)
        assert (ours - model(tokens, adapter=None)).abs().max() > 1e-3  # the trained adapter does something


def test_export_refusals(bases):
    config = load_base(str(bases["MHA"])).base.config
    per_head = Adapter(AdapterConfig(n_prompts=2, n_layers=2), config)
    random_gates(per_head, shared=False)
    with pytest.raises(InteropError, match="different gates per head"):
        adapter_to_peft(per_head)
    multimodal = Adapter(AdapterConfig(n_prompts=2, n_layers=2), config,
                         VisionConfig(model="ViT-B-32", pretrained=None), feature_dim=16)
    with pytest.raises(InteropError, match="projector"):
        adapter_to_peft(multimodal)


def test_peft_import_refusals(bases, tmp_path):
    config = load_base(str(bases["MHA"])).base.config
    not_top = {f"base_model.model.model.layers.{i}.self_attn.adaption_{kind}": torch.zeros(shape)
               for i in (1, 2) for kind, shape in (("prompt", (1, 2, 64)), ("gate", (1,)))}
    with pytest.raises(InteropError, match="adapts layers 1-2"):
        peft_to_adapter({}, not_top, config)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(InteropError, match="of type 'LORA'; only ADAPTION_PROMPT"):
        read_peft(tmp_path)


# ----------------------------------------------------------------------------------------------
# AdapterSet


@pytest.fixture(scope="module")
def chat_base(tmp_path_factory):
    """A tiny HF Llama with a byte-level tokenizer, so generate() works."""
    from conftest import save_tiny_hf

    path = tmp_path_factory.mktemp("chat_base")
    save_tiny_hf(path, seed=5)
    add_byte_tokenizer(path)
    return path


def test_adapter_set_serves_each_adapter_like_loading_it_alone(chat_base, tmp_path):
    folder = tmp_path / "adapters"
    maker = load_base(str(chat_base))
    for name, seed in (("a", 1), ("b", 2)):
        adapter = maker.add_adapter(AdapterConfig(n_prompts=4, n_layers=3), seed=seed)
        random_gates(adapter, shared=name == "a", seed=seed)
        save_adapter(maker, folder / f"{name}.safetensors")
    save_peft(maker.add_adapter(AdapterConfig(n_prompts=2, n_layers=2), seed=3), folder / "p")  # zero gates
    (folder / "broken.safetensors").write_bytes(b"not a safetensors file")

    served = AdapterSet.from_folder(load_base(str(chat_base)), folder)
    assert served.names() == [NO_ADAPTER, "a", "b", "p"]
    assert list(served.errors) == [str(folder / "broken.safetensors")]
    assert "truncated, corrupt or not a safetensors file" in served.errors[str(folder / "broken.safetensors")]

    tokens = _tokens()
    outputs = {}
    for name in ["a", NO_ADAPTER, "b"]:
        alone = load_base(str(chat_base))
        if name != NO_ADAPTER:
            load_adapter(alone, folder / f"{name}.safetensors")
        with torch.no_grad():
            outputs[name] = served.model(tokens, adapter=served.get(name))
            assert torch.equal(outputs[name], alone(tokens))
        text = served.generate(name, "Name a colour.", max_new_tokens=5)
        assert text == alone.generate("Name a colour.", max_new_tokens=5)
        assert "".join(served.stream(name, "Name a colour.", max_new_tokens=5)) == text
    assert not torch.equal(outputs["a"], outputs["b"]) and not torch.equal(outputs["a"], outputs[NO_ADAPTER])
    assert served.model.adapter is None  # nothing was activated on the shared base
    with pytest.raises(ValueError, match="no adapter named 'c'"):
        served.get("c")
