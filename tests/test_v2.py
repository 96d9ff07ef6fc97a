"""LLaMA-Adapter V2 multimodal checkpoints against the reference implementation's own outputs.

The fixtures in tests/fixtures/v2 come from OpenGVLab/LLaMA-Adapter @521a09d run on CPU at tiny
dimensions with seeded random weights (tests/fixtures/v2/make_golden.py regenerates them): a base in
Meta layout, a tiny OpenAI CLIP as an open_clip config + weights, a bias-tuned and a LoRA + bias
checkpoint in the released {"model", "config"} layout, and the reference's visual tokens and logits.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

FIX = Path(__file__).parent / "fixtures" / "v2"
PREFILL = 5  # make_golden.py: logits from one prefill of 5 tokens, then one token at a time
VARIANTS = ["bias", "lora"]


@pytest.fixture(scope="module")
def tiny_vision():
    import open_clip

    from mmadapter.interop_v2 import TOWER

    open_clip.add_model_config(FIX / "clip")  # registers "tiny-v2-clip"
    return dataclasses.replace(TOWER, model="tiny-v2-clip", pretrained=str(FIX / "clip" / "tiny-v2-clip.safetensors"),
                               query_heads=4)


@pytest.fixture(scope="module")
def golden():
    return load_file(FIX / "golden.safetensors")


def v2_model(variant: str, vision):
    from mmadapter import load_base
    from mmadapter.interop import import_adapter

    model = load_base(str(FIX / "base"), dtype=torch.float32)
    model.use_adapter(import_adapter(model, FIX / f"{variant}.pth", vision=vision))  # format detected: v2
    return model


@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_reference(variant, tiny_vision, golden):
    """Visual tokens and logits (prefill and one-token decoding with the KV cache) within 1e-5 of the reference."""
    model = v2_model(variant, tiny_vision)
    base, want = model.base, golden[f"{variant}.logits"]
    with torch.inference_mode():
        features = model.vision(golden["pixels"])  # [1, N * E]: every CLIP token
        assert_close(model.adapter.image_tokens(features), golden[f"{variant}.visual"], atol=1e-5, rtol=0)
        kv = model.adapter_kv(features, torch.tensor([True]))
        tokens = golden["tokens"]
        logits = base.head(base(tokens, adapter=kv))  # [1, T, V], no cache
        assert_close(logits[0, PREFILL - 1:], want, atol=1e-5, rtol=0)
        cache = base.layer_caches(base.new_cache(1, tokens.shape[1]))
        h = base(tokens[:, :PREFILL], input_pos=torch.arange(PREFILL), cache=cache, adapter=kv)
        stepwise = [base.head(h[:, -1])]
        for pos in range(PREFILL, tokens.shape[1]):
            h = base(tokens[:, pos:pos + 1], input_pos=torch.tensor([pos]), cache=cache, adapter=kv)
            stepwise.append(base.head(h[:, -1]))
        assert_close(torch.cat(stepwise), want, atol=1e-5, rtol=0)
        # every V2 piece matters: without the prompt term or the tuning the logits move well past the tolerance
        model.adapter.gates.zero_()
        no_prompt = base.head(base(tokens, adapter=model.adapter_kv(features, torch.tensor([True]))))
        assert (no_prompt[0, PREFILL - 1:] - want).abs().max() > 1e-3
        assert (model.forward(tokens, adapter=None)[0, PREFILL - 1:] - want).abs().max() > 1e-3


def test_tuning_never_enters_the_base(tiny_vision):
    """A V2 request's tuning comes with the request: the base keeps the modules it was loaded with, and a request
    with no adapter (or another one) computes as the plain frozen base, before and after."""
    from mmadapter import load_base

    plain = load_base(str(FIX / "base"), dtype=torch.float32)
    model = v2_model("lora", tiny_vision)
    modules = [(name, id(m), type(m)) for name, m in model.base.named_modules()]
    tokens = torch.tensor([[1, 5, 9, 3]])
    with torch.inference_mode():
        tuned = model(tokens)
        untuned = model(tokens, adapter=None)
        assert (tuned - untuned).abs().max() > 1e-3  # the tuning did change its own request
        assert_close(untuned, plain(tokens), atol=0, rtol=0)
        assert_close(model(tokens), tuned, atol=0, rtol=0)
    assert [(name, id(m), type(m)) for name, m in model.base.named_modules()] == modules


def reference_keys(n_layers: int, lora: bool) -> list[str]:
    """The key set of util/extract_adapter_from_checkpoint.py (reference @521a09d), written out here."""
    keys = [f"visual_blocks.{i}.{k}.{s}" for i in range(8)
            for k in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2") for s in ("weight", "bias")]
    per_layer = ["attention.gate", "attention.wq.bias", "attention.wo.bias", "feed_forward.w1.bias",
                 "feed_forward.w2.bias", "feed_forward.w3.bias", "attention_norm.weight", "ffn_norm.weight"]
    if lora:
        per_layer += [f"attention.lora_w{w}_l{j}.weight" for w in "kovq" for j in (1, 2)]
        per_layer += [f"feed_forward.lora_w{w}_l{j}.weight" for w in "123" for j in (1, 2)] + ["attention.new_gate"]
    keys += [f"llama.layers.{i}.{k}" for i in range(n_layers) for k in per_layer]
    keys += [f"{b}.{s}" for b in ("clip_proj_norm", "visual_proj_norm", "visual_proj", "clip_proj") for s in ("weight", "bias")]
    return keys + ["llama.norm.weight", "visual_query.weight", "adapter_query.weight"]


def released_7b_shapes(lora: bool) -> dict[str, tuple[int, ...]]:
    """Shapes of the released 7B files, from the reference's module definitions (rank 16, K=10, L=31)."""
    c, f, w, r = 4096, 11008, 768, 16
    shape = {"norm1": (w,), "norm2": (w,), "attn.qkv": (3 * w, w), "attn.proj": (w, w), "mlp.fc1": (4 * w, w),
             "mlp.fc2": (w, 4 * w), "attention.gate": (1, 32, 1, 1), "attention.new_gate": (1, 1, 1, 1),
             "wq.bias": (c,), "wo.bias": (c,), "w1.bias": (f,), "w3.bias": (f,), "w2.bias": (c,),
             "attention_norm.weight": (c,), "ffn_norm.weight": (c,), "llama.norm.weight": (c,),
             "clip_proj_norm": (w,), "visual_proj_norm": (c,), "visual_proj.weight": (c, w), "visual_proj.bias": (c,),
             "clip_proj.weight": (w, 768), "clip_proj.bias": (w,), "visual_query.weight": (10, w),
             "adapter_query.weight": (310, c)}
    lora_in = {"wq": c, "wk": c, "wv": c, "wo": c, "w1": c, "w3": c, "w2": f}
    lora_out = {"wq": c, "wk": c, "wv": c, "wo": c, "w1": f, "w3": f, "w2": c}
    out = {}
    for key in reference_keys(32, lora):
        m = [k for k in shape if key.endswith(k) or key.removesuffix(".weight").removesuffix(".bias").endswith(k)]
        if "lora_" in key:
            proj = key.split("lora_")[1][:2]
            out[key] = (r, lora_in[proj]) if "_l1." in key else (lora_out[proj], r)
        elif "visual_blocks" in key and key.endswith(".bias") and not key.split(".")[-2].startswith("norm"):
            out[key] = (shape[".".join(key.split(".")[2:4])][0],)
        else:
            out[key] = shape[max(m, key=len)]
    return out


@pytest.mark.parametrize("lora", [False, True])
def test_released_7b_key_set_loads(lora):
    """The released 7B names and shapes (no data: meta tensors) load with no missing or unexpected key."""
    from mmadapter.config import LlamaConfig
    from mmadapter.interop_v2 import adapter_from_v2, check_tensors, expected_shapes, v2_configs

    base = LlamaConfig.from_name("llama-7b")
    tensors = {k: torch.empty(s, device="meta") for k, s in released_7b_shapes(lora).items()}
    config = {"w_bias": True, "w_lora": lora, "lora_rank": 16}
    adapter_config, vision = v2_configs(config, tensors)
    assert (adapter_config.n_prompts, adapter_config.n_layers, vision.query_depth) == (10, 31, 8)
    check_tensors(tensors, expected_shapes(adapter_config, vision, base), "7B")
    from mmadapter.interop_v2 import implied_base, tensor_problems

    implied = implied_base(tensors, "7B")  # what `info` and `convert` check a file against before any base
    assert (implied.n_layers, implied.dim, implied.n_heads, implied.ffn_dim) == (32, 4096, 32, 11008)
    assert tensor_problems(tensors, expected_shapes(adapter_config, vision, implied)) == {
        "missing": [], "unexpected": [], "misshapen": []}
    with torch.device("meta"):
        adapter = adapter_from_v2(config, tensors, base, feature_dim=257 * 768)
    counts = adapter.parameter_counts()
    assert counts["prompts"] == 310 * 4096 and ("lora" in counts) == lora
    assert adapter.first_layer == 1


def wrong_files(folder: Path) -> dict[str, tuple[Path, str, str]]:
    """bias.pth with one unexpected, one missing and one misshapen tensor: {case: (path, kind, name)}."""
    original = torch.load(FIX / "bias.pth", weights_only=True)
    cases = {
        "unexpected": ({**original["model"], "llama.layers.0.attention.surprise": torch.zeros(3)},
                       "llama.layers.0.attention.surprise"),
        "missing": ({k: v for k, v in original["model"].items() if k != "llama.layers.2.feed_forward.w2.bias"},
                    "llama.layers.2.feed_forward.w2.bias"),
        "misshapen": ({**original["model"], "llama.layers.1.attention.wq.bias": torch.zeros(31)},
                      "llama.layers.1.attention.wq.bias [31] (expected [32])"),
    }
    out = {}
    for kind, (tensors, named) in cases.items():
        path = folder / f"{kind}.pth"
        torch.save({"model": tensors, "config": original["config"]}, path)
        out[kind] = (path, kind, named)
    return out


def test_refuses_wrong_files(tmp_path, tiny_vision):
    """Unexpected, missing and misshapen tensors are refused by name; the reader never unpickles objects."""
    from mmadapter import load_base
    from mmadapter.interop_v2 import V2Error, load_v2

    model = load_base(str(FIX / "base"), dtype=torch.float32)
    for path, _, named in wrong_files(tmp_path).values():
        with pytest.raises(V2Error, match=re.escape(named)):
            load_v2(model, path, tiny_vision)
    # the V1 reader no longer takes a V2 file for a V1 adapter with hundreds of ignored tensors
    from mmadapter.interop import InteropError, detect_format, read_v1

    assert detect_format(FIX / "bias.pth") == "v2"
    with pytest.raises(InteropError, match="V2"):
        read_v1(FIX / "bias.pth")


@pytest.mark.parametrize("variant", VARIANTS)
def test_round_trip_without_loss(variant, tmp_path, tiny_vision):
    """V2 .pth -> mmadapter .safetensors -> V2 .pth gives back every tensor bit for bit, and the
    safetensors file loads to the same model."""
    from mmadapter import load_adapter, load_base, save_adapter
    from mmadapter.interop_v2 import read_v2, save_v2

    model = v2_model(variant, tiny_vision)
    ours = save_adapter(model, tmp_path / "v2.safetensors")
    again = load_base(str(FIX / "base"), dtype=torch.float32)
    again.attach_vision(model.vision)
    loaded = load_adapter(again, ours)
    back = save_v2(loaded, tmp_path / "back.pth")
    config, tensors = read_v2(FIX / f"{variant}.pth")
    config2, tensors2 = read_v2(back)
    assert config2 == config and tensors2.keys() == tensors.keys()
    for k in tensors:
        assert torch.equal(tensors2[k], tensors[k]), k
    tokens = torch.tensor([[1, 4, 8, 15, 16]])
    with torch.inference_mode():
        assert torch.equal(again(tokens), model(tokens))


def test_generation_streams_and_encodes_the_image_once(tiny_vision, monkeypatch):
    """stream() pieces join to generate(); the tower and the visual query run once per request, not per token."""
    from PIL import Image

    from mmadapter.tokenizer import Tokenizer

    model = v2_model("lora", tiny_vision)
    model.tokenizer = _byte_tokenizer(Tokenizer)
    image = Image.new("RGB", (20, 16), (200, 30, 90))
    calls = {"tower": 0, "query": 0}
    tower_forward, query_forward = type(model.vision).forward, type(model.adapter.projector).forward

    def count(name, fn):
        def wrapped(self, x):
            calls[name] += 1
            return fn(self, x)
        return wrapped

    monkeypatch.setattr(type(model.vision), "forward", count("tower", tower_forward))
    monkeypatch.setattr(type(model.adapter.projector), "forward", count("query", query_forward))
    kw = dict(max_new_tokens=12, temperature=0.1, top_p=0.75, seed=3, template="raw")
    text = model.generate("abc", image, **kw)
    assert calls == {"tower": 1, "query": 1}
    model.feature_cache.clear()
    assert "".join(model.stream("abc", image, **kw)) == text
    assert calls == {"tower": 2, "query": 2}


def test_bgr_is_the_default_and_switchable(tiny_vision):
    """V2 towers swap channels before preprocessing, as the reference's cv2.imread does; bgr=False does not."""
    from PIL import Image

    from mmadapter.vision import VisionTower

    picture = Image.new("RGB", (16, 16), (250, 10, 60))
    swapped = Image.new("RGB", (16, 16), (60, 10, 250))
    bgr = VisionTower(tiny_vision)
    rgb = VisionTower(dataclasses.replace(tiny_vision, bgr=False))
    assert torch.equal(bgr.preprocess(picture), rgb.preprocess(swapped))
    assert not torch.equal(bgr.preprocess(picture), rgb.preprocess(picture))
    assert bgr.fingerprint != rgb.fingerprint  # cached features of the two never mix


def test_info_describes_the_variant(capsys):
    from mmadapter.cli import main

    assert main(["info", str(FIX / "lora.pth"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "LLaMA-Adapter V2 multimodal (bias + LoRA r4)"
    assert info["adapter"]["n_prompts"] == 4 and info["adapter"]["n_layers"] == 2
    assert set(info["parameters"]) >= {"prompts", "gates", "projector", "bias", "norms", "lora", "total"}


def _byte_tokenizer(tokenizer_cls):
    """One character per token over the tiny base's 64-token vocabulary (ids 0-2 unk, bos, eos)."""
    import string

    import tokenizers

    from mmadapter.tokenizer_hf import HFBackend

    chars = (string.ascii_letters + string.digits)[:61]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = tokenizers.decoders.Fuse()
    return tokenizer_cls(HFBackend(tok), bos_token="<s>", eos_token="</s>", add_bos=True, chat_template=None,
                         source="test")


def test_app_loads_a_v2_file_and_shows_its_variant(tiny_vision, tmp_path):
    """`serve --adapter file.pth`: the V2 tower is built for it, it is selected, and the status names the variant."""
    from mmadapter.app.serve import add_serve_args, build_service
    import argparse

    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    args = parser.parse_args(["--base", str(FIX / "base"), "--adapter", str(FIX / "lora.pth"),
                              "--vision", f"tiny-v2-clip:{FIX / 'clip' / 'tiny-v2-clip.safetensors'}",
                              "--adapters-dir", str(tmp_path)])
    service = build_service(args)
    assert service.model.vision.config.projector == "visual-query" and service.model.vision.config.bgr
    assert service.adapters.names()[1] == "lora"
    assert "`lora` (LLaMA-Adapter V2 multimodal (bias + LoRA r4))" in service.status_markdown()


def test_fresh_v2_adapter_starts_as_the_base():
    """Zero-init biases, LoRA B and gates, and norms copied from the base: a new V2 adapter changes nothing."""
    from mmadapter import AdapterConfig, load_base

    model = load_base(str(FIX / "base"), dtype=torch.float32)
    tokens = torch.tensor([[1, 9, 27, 3, 44]])
    with torch.inference_mode():
        before = model(tokens)
    model.add_adapter(AdapterConfig(n_prompts=4, n_layers=2, bias_tuning=True, lora_rank=4, new_gate=True), seed=0)
    with torch.inference_mode():
        assert_close(model(tokens), before, atol=1e-6, rtol=0)
    assert {"bias", "lora", "norms"} <= set(model.adapter.parameter_counts())


def test_tuned_base_keeps_only_its_frozen_parameters(tiny_vision):
    """While a V2 adapter is applied the base's parameters are still its own frozen ones (the wrapped projections
    appear as `<name>.frozen`); freezing the model leaves the adapter's tuned tensors trainable."""
    model = v2_model("lora", tiny_vision)
    frozen = {id(p) for p in model.base.parameters()}
    model(torch.tensor([[1, 2, 3]]))  # applies the tuning
    assert {id(p) for p in model.base.parameters()} == frozen
    assert not {id(p) for p in model.adapter.parameters()} & frozen
    model.base.requires_grad_(False)
    assert all(p.requires_grad for p in model.adapter.tuning.parameters())


@pytest.mark.parametrize("dtype", ["int8", "bfloat16"])
def test_tuning_wraps_quantised_and_bf16_bases(dtype, tiny_vision, golden):
    """Biases, norms and LoRA wrap whatever frozen projection the base has: an int8 or bf16 base with the LoRA
    checkpoint stays within its rounding of the fp32 reference (measured ~0.007 / ~0.005 here)."""
    from mmadapter import load_base
    from mmadapter.interop import import_adapter

    model = load_base(str(FIX / "base"), dtype={"int8": "int8", "bfloat16": torch.bfloat16}[dtype])
    model.use_adapter(import_adapter(model, FIX / "lora.pth", vision=tiny_vision))
    with torch.inference_mode():
        features = model.vision(golden["pixels"])
        logits = model(golden["tokens"], image_features=features, has_image=torch.tensor([True]))
    assert_close(logits[0, PREFILL - 1:].float(), golden["lora.logits"], atol=0.03, rtol=0)


@pytest.fixture
def no_tower(monkeypatch):
    """Building any image tower fails, as ViT-L-14 'openai' does offline without cached weights."""
    from mmadapter.vision import VisionTower

    def refuse(self, *args, **kwargs):
        raise RuntimeError("no CLIP weights here")

    monkeypatch.setattr(VisionTower, "__init__", refuse)


def test_info_names_unexpected_missing_and_misshapen_tensors(tmp_path, capsys, no_tower):
    """`info` warns naming the tensor (exit 0) and fails with --strict (exit 1); a good file passes --strict."""
    from mmadapter.cli import main

    for path, kind, named in wrong_files(tmp_path).values():
        assert main(["info", str(path), "--json"]) == 0
        out, err = capsys.readouterr()
        assert "warning" in err and named in err, err
        assert named in json.loads(out)["tensor_check"][kind]
        assert main(["info", str(path), "--strict"]) == 1
        assert named in capsys.readouterr().err
    assert main(["info", str(FIX / "lora.pth"), "--strict", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tensor_check"].startswith("ok")


def test_convert_refuses_a_wrong_file_by_name_before_reading_the_base(tmp_path, capsys, no_tower):
    from mmadapter.cli import main

    for path, _, named in wrong_files(tmp_path).values():
        out = tmp_path / f"{path.stem}.safetensors"
        argv = ["convert", str(path), str(out), "--to", "mmadapter", "--base", str(tmp_path / "no-such-base")]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert named in err and "no-such-base" not in err, err
        assert not out.exists()


@pytest.mark.parametrize("variant", VARIANTS)
def test_convert_both_ways_through_the_cli_without_a_tower(variant, tmp_path, tiny_vision, monkeypatch):
    """`mmadapter convert X.pth X.safetensors --to mmadapter` builds no tower (only open_clip's config of the
    named model is read), `convert X.safetensors back.pth --to v2` gives every tensor back bit for bit, and
    the converted file loads over the tower and answers as the V2 file does."""
    import open_clip

    from mmadapter import load_adapter, load_base
    from mmadapter.cli import main
    from mmadapter.interop_v2 import read_v2
    from mmadapter.vision import VisionTower

    ours, back = tmp_path / "v2.safetensors", tmp_path / "back.pth"
    built = VisionTower.__init__
    with monkeypatch.context() as m:
        m.setattr(VisionTower, "__init__", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no CLIP weights")))
        assert main(["convert", str(FIX / f"{variant}.pth"), str(ours), "--to", "mmadapter",
                     "--base", str(FIX / "base"), "--vision", "tiny-v2-clip"]) == 0
        assert main(["convert", str(ours), str(back), "--to", "v2"]) == 0
    assert VisionTower.__init__ is built and open_clip.get_model_config("tiny-v2-clip") is not None
    config, tensors = read_v2(FIX / f"{variant}.pth")
    config2, tensors2 = read_v2(back)
    assert config2 == config and tensors2.keys() == tensors.keys()
    assert all(torch.equal(tensors2[k], tensors[k]) for k in tensors)
    reference = v2_model(variant, tiny_vision)
    loaded = load_base(str(FIX / "base"), dtype=torch.float32)
    loaded.use_adapter(load_adapter(loaded, ours, activate=False, vision=tiny_vision.spec))
    mine, theirs = loaded.adapter.state_dict(), reference.adapter.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert loaded.vision.feature_dim == reference.vision.feature_dim  # sized from the config as the tower is
    tokens = torch.tensor([[1, 4, 8, 15, 16]])
    with torch.inference_mode():
        assert torch.equal(loaded(tokens), reference(tokens))
