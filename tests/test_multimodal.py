"""The image token reaches every adapted layer's prompts, per sample, and only there."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from test_vision import TINY_VIT, register_tiny_models, save_reference

from mmadapter import AdapterConfig, VisionConfig, build_model, load_base
from mmadapter.adapter_file import AdapterFileError, load_adapter, save_adapter


@pytest.fixture(scope="module")
def vit_weights(tmp_path_factory):
    register_tiny_models(tmp_path_factory.mktemp("open_clip_configs"))
    path = tmp_path_factory.mktemp("clip") / "tiny_vit.safetensors"
    save_reference(TINY_VIT, path, seed=0)
    return path


@pytest.fixture()
def mm_model(tiny_hf, vit_weights):
    model = build_model(str(tiny_hf[0]), AdapterConfig(n_prompts=4, n_layers=2),
                        VisionConfig(model=TINY_VIT, pretrained=str(vit_weights), projector_hidden=16), seed=0)
    return model


def _images(*colours):
    return [None if c is None else Image.new("RGB", (40, 40), c) for c in colours]


def _tokens(b=2, t=12):
    return torch.randint(3, 256, (b, t), generator=torch.Generator().manual_seed(0))


def test_zero_gates_equal_base_whatever_the_image(mm_model):
    tokens = _tokens()
    with torch.no_grad():
        base = mm_model(tokens, adapter=None)
        for colours in [("red", "blue"), ("green", None)]:
            feats, has = mm_model.image_features(_images(*colours))
            assert torch.equal(mm_model(tokens, feats, has), base)


def test_image_changes_output_once_gates_open(mm_model):
    with torch.no_grad():
        mm_model.adapter.gates.fill_(0.5)
        tokens = _tokens(1)
        a = mm_model(tokens, *mm_model.image_features(_images("red")))
        b = mm_model(tokens, *mm_model.image_features(_images("blue")))
        plain = mm_model(tokens)
    assert (a - b).abs().max() > 1e-4 and (a - plain).abs().max() > 1e-4


def test_mixed_batch_isolation(mm_model):
    with torch.no_grad():
        mm_model.adapter.gates.fill_(0.5)
        tokens = _tokens(3)
        out1 = mm_model(tokens, *mm_model.image_features(_images("red", "blue", None)))
        out2 = mm_model(tokens, *mm_model.image_features(_images("red", "yellow", None)))
        alone_text = mm_model(tokens[2:])  # the text-only sample, with plain prompts, on its own
    torch.testing.assert_close(out1[0], out2[0], atol=1e-6, rtol=0)  # sample 1's image does not leak
    assert (out1[1] - out2[1]).abs().max() > 1e-4
    torch.testing.assert_close(out1[2], alone_text[0], atol=1e-5, rtol=0)  # text-only rows get plain prompts


def test_image_token_is_added_to_every_adapted_layers_prompts(mm_model):
    with torch.no_grad():
        feats, has = mm_model.image_features(_images("red"))
        tok = mm_model.adapter.image_tokens(feats, has)  # [1, C]
        kv = mm_model.adapter.prompt_kv(mm_model.base, tok)
        for i, (k, v) in enumerate(kv.kv):
            attn = mm_model.base.layers[kv.first_layer + i].attention
            want_k, want_v = attn.project_prompt(mm_model.adapter.prompts[i][None] + tok[:, None])
            torch.testing.assert_close(k, want_k)
            torch.testing.assert_close(v, want_v)


def test_adapter_file_carries_the_vision_side(mm_model, tiny_hf, tmp_path):
    with torch.no_grad():
        mm_model.adapter.gates.fill_(0.3)
        mm_model.adapter.projector.fc2.bias.add_(0.1)
    path = save_adapter(mm_model, tmp_path / "mm.safetensors")
    fresh = load_base(str(tiny_hf[0]))  # no tower yet: loading builds it from the file
    load_adapter(fresh, path)
    assert fresh.vision is not None and fresh.vision.fingerprint == mm_model.vision.fingerprint
    tokens = _tokens(1)
    with torch.no_grad():
        want = mm_model(tokens, *mm_model.image_features(_images("red")))
        got = fresh(tokens, *fresh.image_features(_images("red")))
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def _answer_to_red(model, adapter=None):
    """Logits for one token sequence about a red image, through `adapter` (default: the active one)."""
    kw = {} if adapter is None else {"adapter": adapter}
    with torch.no_grad():
        return model(_tokens(1), *model.image_features(_images("red"), **kw), **kw)


def _saved_with_open_gates(model, path):
    with torch.no_grad():
        model.adapter.gates.fill_(0.3)
    return save_adapter(model, path)


def _over_another_tower(tiny_hf):
    """A model over the same base whose tower has other (random, seed 5) weights than mm_model's."""
    return build_model(str(tiny_hf[0]), AdapterConfig(n_prompts=4, n_layers=2),
                       VisionConfig(model=TINY_VIT, pretrained=None, projector_hidden=16, seed=5), seed=3)


def test_each_adapter_gets_the_tower_it_was_trained_with(mm_model, tiny_hf, tmp_path):
    """Two adapters over different towers in one set: both load and answer as each does alone."""
    from mmadapter.adapter_set import AdapterSet

    first = _saved_with_open_gates(mm_model, tmp_path / "first.safetensors")
    other = _over_another_tower(tiny_hf)
    second = _saved_with_open_gates(other, tmp_path / "second.safetensors")
    third = tmp_path / "third.safetensors"  # trained over the same tower as first: shares it
    third.write_bytes(first.read_bytes())

    served = AdapterSet.from_paths(load_base(str(tiny_hf[0])), [first, second, third])
    assert not served.errors, served.errors
    model = served.model
    torch.testing.assert_close(_answer_to_red(model, served.get("first")), _answer_to_red(mm_model), atol=0, rtol=0)
    torch.testing.assert_close(_answer_to_red(model, served.get("second")), _answer_to_red(other), atol=0, rtol=0)
    assert model.tower_for(served.get("third")) is model.tower_for(served.get("first"))  # shared, built once
    assert model.tower_for(served.get("second")) is not model.tower_for(served.get("first"))
    assert len({id(t) for t in (model.vision, *model.towers.values())}) == 2
    # a model already holding another tower gives a loaded adapter its own, without replacing the model's
    adapter = load_adapter(other, first)
    assert other.tower_for(adapter) is not other.vision
    torch.testing.assert_close(_answer_to_red(other, adapter), _answer_to_red(mm_model), atol=0, rtol=0)


def test_a_saved_adapter_names_its_own_tower_not_the_models(mm_model, tiny_hf, tmp_path):
    """An adapter holding its own tower (the model's is another) is saved with that tower, so it loads again."""
    from mmadapter.adapter_file import read_adapter

    first = _saved_with_open_gates(mm_model, tmp_path / "first.safetensors")
    other = _over_another_tower(tiny_hf)
    adapter = load_adapter(other, first, activate=False)
    again = save_adapter(other, tmp_path / "again.safetensors", adapter=adapter)
    meta = read_adapter(again)[0]
    assert other.vision.weights_hash != mm_model.vision.weights_hash
    assert meta.vision.weights_hash == mm_model.vision.weights_hash
    assert meta.vision.spec == mm_model.vision.config.spec and meta.feature_dim == mm_model.vision.feature_dim
    fresh = load_base(str(tiny_hf[0]))
    load_adapter(fresh, again)
    torch.testing.assert_close(_answer_to_red(fresh), _answer_to_red(mm_model), atol=0, rtol=0)


def test_moved_tower_weights_are_named_and_found_again_with_vision(mm_model, tiny_hf, tmp_path):
    import shutil

    weights = tmp_path / "vit.safetensors"
    shutil.copy(mm_model.vision.config.pretrained, weights)
    model = build_model(str(tiny_hf[0]), AdapterConfig(n_prompts=4, n_layers=2),
                        VisionConfig(model=TINY_VIT, pretrained=str(weights), projector_hidden=16), seed=0)
    with torch.no_grad():
        model.adapter.gates.fill_(0.3)
    path = save_adapter(model, tmp_path / "mm.safetensors")
    moved = weights.rename(tmp_path / "moved.safetensors")
    with pytest.raises(AdapterFileError) as info:
        load_adapter(load_base(str(tiny_hf[0])), path)
    message = str(info.value)
    assert "image tower" in message and TINY_VIT in message and f"--vision {TINY_VIT}:/path/to/weights" in message
    fresh = load_base(str(tiny_hf[0]))
    load_adapter(fresh, path, vision=f"{TINY_VIT}:{moved}")
    torch.testing.assert_close(_answer_to_red(fresh), _answer_to_red(model), atol=0, rtol=0)
    save_reference(TINY_VIT, weights, seed=1)  # other weights where the file says: refused, not used
    with pytest.raises(AdapterFileError, match="other weights than in training"):
        load_adapter(load_base(str(tiny_hf[0])), path)


def test_random_weight_tower_adapter_loads_again_in_a_new_process(tiny_hf, vit_weights, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    model = build_model(str(tiny_hf[0]), AdapterConfig(n_prompts=4, n_layers=2),
                        VisionConfig(model=TINY_VIT, pretrained=None, projector_hidden=16), seed=0)
    with torch.no_grad():
        model.adapter.gates.fill_(0.3)
    path = save_adapter(model, tmp_path / "random_tower.safetensors")
    torch.save(_answer_to_red(model), tmp_path / "want.pt")
    tests = Path(__file__).parent
    script = f"""
import sys, torch
sys.path[:0] = [{str(tests)!r}, {str(tests.parent)!r}]
from test_vision import register_tiny_models
from test_multimodal import _answer_to_red
from mmadapter import load_base
from mmadapter.adapter_file import load_adapter
register_tiny_models(__import__("pathlib").Path({str(vit_weights.parent)!r}))
model = load_base({str(tiny_hf[0])!r})
load_adapter(model, {str(path)!r})
torch.testing.assert_close(_answer_to_red(model), torch.load({str(tmp_path / "want.pt")!r}), atol=0, rtol=0)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_adapter_refuses_a_different_base(mm_model, tmp_path):
    from conftest import save_tiny_hf

    path = save_adapter(mm_model, tmp_path / "mm.safetensors")
    save_tiny_hf(tmp_path / "other", seed=7)
    with pytest.raises(AdapterFileError, match="fingerprint"):
        load_adapter(load_base(str(tmp_path / "other")), path)


def test_one_image_token_reaches_a_layer_as_one_vector_at_every_position(mm_model):
    """With one image token added to all K prompts, the prompt scores shift equally (their own softmax
    cancels it) and each head's weights sum to 1, so the image adds the same vector at every position and
    for every question: wo(concat_h tanh(g_h) W_v,h I_p). This is why V1 answers about images come from a
    per-layer shift of the residual stream, not from a question-dependent look at the image."""
    model, adapter = mm_model, mm_model.adapter
    with torch.no_grad():
        adapter.gates.normal_(0, 0.5)
    attention = model.base.layers[adapter.first_layer].attention
    outputs = []
    handle = attention.register_forward_hook(lambda module, args, output: outputs.append(output))
    tokens = _tokens(2, 9)
    features, has_image = model.image_features(_images("red", "red"))
    with torch.no_grad():
        model(tokens, features, has_image)
        model(tokens, features, torch.zeros_like(has_image))
        image_token = adapter.image_tokens(features[:1])  # [1, C]
        value = attention.wv(image_token).view(attention.n_kv_heads, attention.head_dim)  # [G, d]
        per_head = value.repeat_interleave(attention.n_heads // attention.n_kv_heads, 0)  # [H, d]
        expected = attention.wo((torch.tanh(adapter.gates[0])[:, None] * per_head).reshape(1, -1))  # [1, C]
    handle.remove()
    shift = outputs[0] - outputs[1]  # [B, T, C]
    assert shift.abs().max() > 1e-3
    torch.testing.assert_close(shift, expected.expand_as(shift), rtol=1e-4, atol=1e-5)
