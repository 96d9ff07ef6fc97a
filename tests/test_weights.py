"""Base loaders: Meta layout (sharded too), clear errors for broken checkpoints, offline hub ids."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch

from mmadapter import CheckpointError, load_base
from mmadapter.weights import embedded_path


def _to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """What Meta's checkpoints hold: q/k rows of each head interleaved (inverse of HF's conversion permute)."""
    out, inp = w.shape
    return w.view(n_heads, 2, out // n_heads // 2, inp).transpose(1, 2).reshape(out, inp)


def write_meta_checkpoint(hf_model, path, n_shards: int = 1) -> None:
    """Convert a transformers Llama to Meta's layout (params.json + consolidated.NN.pth), model-parallel shards."""
    cfg = hf_model.config
    sd = hf_model.state_dict()
    meta = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
            "output.weight": sd["lm_head.weight"], "rope.freqs": torch.ones(8)}
    names = {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo"}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        for hf_name, name in names.items():
            w = sd[p + f"self_attn.{hf_name}.weight"]
            if name in ("wq", "wk"):
                w = _to_interleaved(w, cfg.num_attention_heads if name == "wq" else cfg.num_key_value_heads)
            meta[f"layers.{i}.attention.{name}.weight"] = w
        for hf_name, name in {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}.items():
            meta[f"layers.{i}.feed_forward.{name}.weight"] = sd[p + f"mlp.{hf_name}.weight"]
        meta[f"layers.{i}.attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        meta[f"layers.{i}.ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
    # Meta's model-parallel split: column-parallel rows, row-parallel columns, embedding columns.
    split_dim = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}
    shards = [{} for _ in range(n_shards)]
    for key, w in meta.items():
        dim = split_dim.get(key.split(".")[-2])
        for s, part in enumerate(w.chunk(n_shards, dim) if dim is not None else [w] * n_shards):
            shards[s][key] = part.clone()
    for s, shard in enumerate(shards):
        torch.save(shard, path / f"consolidated.{s:02d}.pth")
    params = {"dim": cfg.hidden_size, "n_layers": cfg.num_hidden_layers, "n_heads": cfg.num_attention_heads,
              "n_kv_heads": cfg.num_key_value_heads, "vocab_size": cfg.vocab_size, "multiple_of": 32,
              "ffn_dim_multiplier": 0.9, "norm_eps": cfg.rms_norm_eps}  # 0.9 * int(2*4*64/3) -> 160, as the HF model
    (path / "params.json").write_text(json.dumps(params))


@pytest.mark.parametrize("n_shards", [1, 2])
def test_meta_layout_loads_to_same_logits(tiny_hf, tmp_path, n_shards):
    hf_dir, hf = tiny_hf
    write_meta_checkpoint(hf, tmp_path, n_shards)
    meta_model, hf_model = load_base(str(tmp_path)), load_base(str(hf_dir))
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(meta_model(tokens), hf_model(tokens), atol=1e-6, rtol=0)


def test_truncated_safetensors_is_a_clear_error(tiny_hf, tmp_path):
    for f in tiny_hf[0].iterdir():
        shutil.copy(f, tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*(truncated|corrupt)"):
        load_base(str(tmp_path))


def test_truncated_gguf_is_a_clear_error(tmp_path):
    data = embedded_path("smollm2-135m-instruct").read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match=r"cut\.gguf.*truncated"):
        load_base(str(bad))


def test_shape_mismatch_names_the_tensor(tiny_hf, tmp_path):
    for f in tiny_hf[0].iterdir():
        shutil.copy(f, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 192
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"shape mismatch.*feed_forward\.w1\.weight.*\(160, 64\).*\(192, 64\)"):
        load_base(str(tmp_path))


def test_missing_tensor_is_reported(tiny_hf, tmp_path):
    from safetensors.torch import load_file, save_file

    for f in tiny_hf[0].iterdir():
        shutil.copy(f, tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    del sd["model.layers.3.mlp.up_proj.weight"]
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing 1 tensors.*layers\.3\.feed_forward\.w3\.weight"):
        load_base(str(tmp_path))


def test_unsupported_architecture_is_refused(tiny_hf, tmp_path):
    for f in tiny_hf[0].iterdir():
        shutil.copy(f, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model_type 'gpt2' is not supported"):
        load_base(str(tmp_path))


def test_hub_id_offline_fails_fast_with_a_way_out(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(CheckpointError, match="pass a local path"):
        load_base("some-org/some-model-that-is-not-cached")
    assert time.monotonic() - start < 10


def test_unknown_spec_lists_the_options():
    with pytest.raises(CheckpointError, match="smollm2-135m-instruct"):
        load_base("definitely not a model")


def test_random_preset_has_config_shapes():
    model = load_base("tiny")
    assert model.tokenizer is None and model.base.config.n_kv_heads == 2
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 256)
