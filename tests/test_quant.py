"""Weight-only quantised base: linears against the fp32 product, GGUF Q4 blocks against gguf's own
dequantisation, training through an int8 base, state-dict and device guards, bytes per token; fp16 weights
on fbgemm's kernel against fp32's greedy text, held only as fbgemm's packed copy, across save/load and
without fbgemm."""

from __future__ import annotations

import copy
import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from mmadapter import AdapterConfig, build_model, load_base
from mmadapter.gguf_tensor import GGUFTensor
from mmadapter.llama import Llama
from mmadapter.int4_layout import Int4LayoutError, cpu_capability, layout_for
from mmadapter.generate import Sampling, decode_tokens
from mmadapter.quant import (KERNEL_MAX_ROWS, ROW_CHUNK, Fp16Linear, Int4Linear, Int8Linear, QuantEmbedding,
                             QuantKernelError, bytes_per_token, fbgemm_available, kernels_available, resolve_dtype)
from mmadapter.weights import build_llama, interleaved_to_half

pytestmark = pytest.mark.skipif(not kernels_available(torch.device("cpu")),
                                reason="this PyTorch build has no weight-only CPU kernels")

# Relative error ‖y - y_fp32‖ / ‖y_fp32‖ allowed per scheme on Gaussian weights and inputs: int8 rounds each
# weight to 1/254 of its row's range, 4-bit to 1/30 of its group's; bf16 activations add ~0.4%. fp16 keeps 11
# significant bits of each weight and the activations stay fp32 (~3e-4).
TOLERANCE = {"int8": 0.01, "int4": 0.12, "fp16w": 0.001}
MAKERS = {"int8": Int8Linear, "int4": Int4Linear, "fp16w": Fp16Linear}
FBGEMM = fbgemm_available(torch.device("cpu"))
needs_fbgemm = pytest.mark.skipif(not FBGEMM, reason="this PyTorch build has no fbgemm engine")


def rel_err(y, ref):
    return float((y.float() - ref).norm() / ref.norm())


@pytest.mark.parametrize("scheme", ["int8", "int4", "fp16w"])
@pytest.mark.parametrize("rows", [1, 5, KERNEL_MAX_ROWS + 30])  # the bf16 kernel and the dequantised matmul
def test_quantised_linear_matches_fp32(scheme, rows):
    torch.manual_seed(0)
    w, x = torch.randn(96, 128), torch.randn(rows, 128)
    layer = MAKERS[scheme].from_float(w)
    ref = F.linear(x, w)
    assert rel_err(layer(x), ref) < TOLERANCE[scheme]
    assert layer(x).dtype == torch.float32 and layer(x[None]).shape == (1, rows, 96)
    # both paths compute with the same dequantised weight (the kernel in bf16 activations)
    assert rel_err(layer(x), F.linear(x, layer.dense_weight())) < 0.01


def test_int4_codes_roundtrip_through_the_kernel_layout():
    codes = torch.randint(0, 16, (64, 96), dtype=torch.uint8)
    layer = Int4Linear(codes, torch.ones(64, 3), torch.zeros(64, 3))
    assert torch.equal(layer.codes(0, 64), codes)
    assert torch.equal(layer.codes(32, 64), codes[32:])
    # the kernel itself reads what codes() says: x = identity recovers (codes - 8) column by column
    out = layer(torch.eye(96))  # [in, out] = Wᵀ
    assert torch.equal(out.t(), codes.float() - 8)


@pytest.mark.parametrize("rows", [32, 96, 192, 64 * 3 + 32])  # whole and partial blocks of every capability
def test_int4_layout_is_learnt_for_this_cpu(rows):
    codes = torch.randint(0, 16, (rows, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(rows))
    layer = Int4Linear(codes, torch.ones(rows, 2), torch.zeros(rows, 2))
    assert torch.equal(layer.codes(0, rows), codes)
    assert torch.equal(layer.codes(rows - 32, rows), codes[-32:])  # any row range, not only whole blocks
    assert rel_err(layer.kernel(torch.eye(64, dtype=torch.bfloat16)).t(), codes.float() - 8) == 0


def test_an_unrecognised_int4_layout_is_refused(monkeypatch):
    import mmadapter.int4_layout as int4_layout

    real_pack = int4_layout.pack

    def scrambled(codes):  # bytes in an order no per-row rule describes
        packed = real_pack(codes)
        order = torch.randperm(packed.numel(), generator=torch.Generator().manual_seed(0))
        return packed.reshape(-1)[order].view(packed.shape)

    monkeypatch.setattr(int4_layout, "pack", scrambled)
    int4_layout._row_placement.cache_clear()
    try:
        with pytest.raises(Int4LayoutError, match=f"capability {cpu_capability()}"):
            layout_for.__wrapped__(48, 32)
    finally:
        int4_layout._row_placement.cache_clear()


@pytest.mark.parametrize("scheme", ["int8", "int4", pytest.param("fp16w", marks=needs_fbgemm)])
def test_a_kernel_that_disagrees_with_its_weight_is_refused(scheme):
    torch.manual_seed(0)
    layer = MAKERS[scheme].from_float(torch.randn(64, 96))
    layer.check_kernel()  # agrees
    misread = layer.dequantize
    layer.dequantize = lambda start, end, dtype: misread(start, end, dtype).flip(-1)  # codes read back wrongly
    with pytest.raises(QuantKernelError, match=f"capability {cpu_capability()}"):
        layer.check_kernel()


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
@pytest.mark.parametrize("permute_heads", [0, 2])
def test_gguf_q4_blocks_load_without_dequantising(kind, permute_heads):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 96)).astype(np.float32) * 0.05 + 0.01
    qtype = GGMLQuantizationType[kind]
    blocks = quantize(w, qtype)
    tensor = SimpleNamespace(data=blocks, tensor_type=qtype, shape=[96, 64], name="t")
    ref = torch.from_numpy(dequantize(blocks, qtype).reshape(64, 96).astype(np.float32))
    if permute_heads:
        ref = interleaved_to_half(ref, permute_heads)
    source = GGUFTensor(tensor, None, permute_heads)
    codes, scales, zeros = source.int4_parts()
    layer = Int4Linear(codes, scales, zeros)
    # the reference is (codes - 8) * d + zero with gguf's own f16 scales (to fp32 rounding of m + 8d)
    group = lambda t: t.repeat_interleave(32, dim=1)  # noqa: E731
    torch.testing.assert_close((codes.float() - 8) * group(scales) + group(zeros), ref, rtol=0, atol=1e-6)
    # the kernel holds the same codes; only its scales are rounded to bf16 (its scale dtype)
    assert torch.equal(layer.codes(0, 64), codes)
    bound = 2**-8 * (8 * group(scales).abs() + group(zeros).abs())
    assert bool(((layer.dense_weight() - ref).abs() <= bound).all())


def test_embedded_gguf_int4_layer_equals_dequantised_reference(smollm):
    q4 = load_base("smollm2-135m-instruct", dtype="int4")
    layer = q4.base.layers[3].attention.wq  # Q4_1 in the file, rows permuted to the half-split layout
    assert isinstance(layer, Int4Linear)
    ref = smollm.base.layers[3].attention.wq.weight  # gguf's dequantisation, permuted by the float loader
    err = (layer.dense_weight() - ref).abs().max()
    assert err <= 2**-7 * ref.abs().max(), float(err)
    x = torch.randn(1, 576)
    assert rel_err(layer(x), F.linear(x, ref)) < 0.01


@pytest.mark.parametrize("scheme", ["int8", "fp16w"])
def test_training_over_a_quantised_base_moves_only_the_adapter(scheme):
    torch.manual_seed(0)
    model = build_model("tiny", AdapterConfig(n_prompts=4, n_layers=2), dtype=scheme, seed=0)
    assert isinstance(model.base.layers[0].attention.wq, MAKERS[scheme])
    base_before = {k: v.clone() for k, v in model.base.state_dict().items()}
    adapter_before = {k: v.clone() for k, v in model.adapter.state_dict().items()}
    tokens = torch.randint(3, 256, (4, 24), generator=torch.Generator().manual_seed(1))
    labels = tokens.clone()
    labels[:, :12] = -100
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=3e-2)
    losses = []
    for _ in range(25):
        loss = model.loss(tokens, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    for k, v in model.base.state_dict().items():
        assert torch.equal(v, base_before[k]), k
    assert all(not torch.equal(v, adapter_before[k]) for k, v in model.adapter.state_dict().items())


@pytest.mark.parametrize("scheme", ["int8", "fp16w"])
@pytest.mark.parametrize("rows", [3, KERNEL_MAX_ROWS + 10])
def test_input_gradient_uses_the_dequantised_weight(scheme, rows):
    torch.manual_seed(0)
    layer = MAKERS[scheme].from_float(torch.randn(64, 96))
    x = torch.randn(rows, 96, requires_grad=True)
    g = torch.randn(rows, 64)
    (layer(x) * g).sum().backward()
    torch.testing.assert_close(x.grad, g @ layer.dense_weight())


def test_quantised_state_dict_is_not_a_full_precision_one():
    q = load_base("tiny", dtype="int4")
    with pytest.raises(RuntimeError, match="Missing key"):
        with torch.device("meta"):
            Llama(q.base.config).load_state_dict(q.base.state_dict(), strict=True, assign=True)


def test_unsupported_device_falls_back_with_one_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="mmadapter.quant"):
        assert resolve_dtype("int8", torch.device("cuda")) == torch.bfloat16
    assert len(caplog.records) == 1 and "int8" in caplog.text and "bfloat16" in caplog.text
    with pytest.raises(ValueError, match="int4"):
        resolve_dtype("int3", torch.device("cpu"))


def test_fp16w_is_a_cpu_scheme_and_says_when_fbgemm_is_missing(caplog, monkeypatch):
    with caplog.at_level(logging.WARNING, logger="mmadapter.quant"):
        assert resolve_dtype("fp16w", torch.device("cuda")) == torch.bfloat16
        assert "fp16w" in caplog.text and "bfloat16" in caplog.text
        caplog.clear()
        monkeypatch.setattr(type(torch.backends.quantized), "supported_engines", ["qnnpack"])
        assert resolve_dtype("fp16w", torch.device("cpu")) == "fp16w"  # still right, only slower
    assert len(caplog.records) == 1 and "fbgemm" in caplog.text


@pytest.mark.parametrize("scheme", ["int8", "int4", "fp16w"])
def test_bytes_per_token_counts_the_stored_weights(scheme):
    q = load_base("tiny", dtype=scheme)
    read = sum(t.numel() * t.element_size() for name, t in q.base.state_dict().items() if "norm" not in name)
    assert bytes_per_token(q.base.config, scheme) == read
    fp = load_base("tiny")
    assert bytes_per_token(fp.base.config, torch.float32) == sum(
        p.numel() * 4 for n, p in fp.base.named_parameters() if "norm" not in n)


def test_info_reports_decode_bytes_per_token():
    from mmadapter.commands.info import describe
    from mmadapter.weights import embedded_path

    info = describe(embedded_path("smollm2-135m-instruct"))  # headers only
    per_token = info["decode_bytes_per_token"]
    norms = (2 * 30 + 1) * 576  # two per layer and the final one: not matrices
    assert per_token["float32"] == 4 * (info["weights"]["parameters"] - norms)
    assert per_token["float32"] == 2 * per_token["bfloat16"] > per_token["int8"] > per_token["int4"]
    assert per_token["fp16w"] == per_token["bfloat16"]  # the embedding / tied head is fp16 too


@pytest.mark.parametrize("scheme", ["int8", "fp16w"])
def test_fsdp_refuses_a_quantised_base(scheme):
    from mmadapter.commands.train import ModelOptions, build_training_model

    with pytest.raises(ValueError, match="--fsdp .* quantised base"):
        build_training_model(ModelOptions(base="tiny", dtype=scheme), seed=0, fsdp=True)


# ----------------------------------------------------------------------------------------------
# fp16 weights, fp32 activations (fbgemm)


def test_fp16_weights_are_the_rounded_weight_and_the_kernel_multiplies_by_them():
    torch.manual_seed(0)
    w = torch.randn(96, 128) * 0.05
    layer = Fp16Linear.from_float(w)
    assert layer.weight_fp16.dtype == torch.float16 and layer.kernel_dtype == torch.float32
    assert torch.equal(layer.dense_weight(), w.half().float())
    for rows in (1, 7, KERNEL_MAX_ROWS):  # the kernel, fp32 in and out
        x = torch.randn(rows, 128)
        y = layer(x)
        assert y.dtype == torch.float32
        assert rel_err(y, F.linear(x, layer.dense_weight())) < 1e-5  # same weights, fp32 sums: only sum order
    assert (layer._packed is not None) == FBGEMM  # the few-rows path went through fbgemm where it exists
    layer.check_kernel()


def test_fp16_weights_beyond_its_range_are_refused():
    with pytest.raises(ValueError, match="fp16's range .* float32"):
        Fp16Linear.from_float(torch.tensor([[1.0, 7e4]]))


@needs_fbgemm
def test_fp16_layer_without_fbgemm_multiplies_by_the_converted_weight(monkeypatch):
    torch.manual_seed(0)
    w, x = torch.randn(64, 96), torch.randn(3, 96)
    with_fbgemm = Fp16Linear.from_float(w)(x)

    def refused(*args):
        raise AssertionError("fbgemm was called although the engine is missing")

    monkeypatch.setattr(type(torch.backends.quantized), "supported_engines", ["qnnpack"])
    monkeypatch.setattr(torch.ops.quantized, "linear_dynamic_fp16", refused)
    monkeypatch.setattr(torch.ops.quantized, "linear_prepack_fp16", refused)
    layer = Fp16Linear.from_float(w)
    layer.check_kernel()  # a base without fbgemm still builds
    without = layer(x)
    torch.testing.assert_close(without, F.linear(x, layer.dense_weight()), rtol=0, atol=0)
    assert rel_err(without, with_fbgemm) < 1e-5 and layer._packed is None


@needs_fbgemm
def test_fp16_state_dict_round_trip_repacks_the_loaded_weight():
    torch.manual_seed(0)
    saved, other = Fp16Linear.from_float(torch.randn(64, 96)), Fp16Linear.from_float(torch.randn(64, 96))
    x = torch.randn(2, 96)
    state = saved.state_dict()
    assert set(state) == {"weight_fp16"} and state["weight_fp16"].dtype == torch.float16  # no packed copy saved
    other(x)  # packs other's own weight
    other.load_state_dict(state, strict=True)  # written in place: the packed copy must follow
    torch.testing.assert_close(other(x), saved(x), rtol=0, atol=0)
    replaced = Fp16Linear.from_float(torch.randn(64, 96))
    replaced(x)
    replaced.load_state_dict(state, strict=True, assign=True)  # a new tensor
    torch.testing.assert_close(replaced(x), saved(x), rtol=0, atol=0)


@needs_fbgemm
def test_fp16_layer_holds_only_fbgemms_packed_weight(tmp_path):
    """2 bytes per weight, not 4: no fp16 copy beside the packed one, yet the state dict saves the fp16 weight."""
    torch.manual_seed(0)
    w, x = torch.randn(64, 96), torch.randn(3, 96)
    layer = Fp16Linear.from_float(w)
    assert layer._packed is not None
    assert sum(b.nbytes for b in layer.buffers()) == 0 and not list(layer.parameters())
    assert not [k for k, v in vars(layer).items() if isinstance(v, torch.Tensor)]  # nor a tensor held aside
    state = layer.state_dict()
    assert list(state) == ["weight_fp16"] and torch.equal(state["weight_fp16"], w.half())  # the key saved files hold
    save_file(state, tmp_path / "layer.safetensors")
    loaded = Fp16Linear.from_float(torch.randn(64, 96))
    loaded.load_state_dict(load_file(tmp_path / "layer.safetensors"), strict=True)
    torch.testing.assert_close(loaded(x), layer(x), rtol=0, atol=0)
    assert sum(b.nbytes for b in loaded.buffers()) == 0  # loading repacked and let the fp16 weight go again


@needs_fbgemm
def test_fp16_layer_moves_and_casts_through_its_fp16_weight():
    torch.manual_seed(0)
    w, x = torch.randn(64, 96), torch.randn(3, 96)
    layer = Fp16Linear.from_float(w)
    y, packed = layer(x), layer._packed
    assert layer.to("cpu")._packed is packed  # staying fp16 on the CPU keeps the packed copy
    moved = copy.deepcopy(layer).to("meta")  # off the CPU: the fp16 weight itself, no packed copy
    assert moved._packed is None and moved.weight_fp16.shape == (64, 96) and moved.weight_fp16.dtype == torch.float16
    layer.float()  # a cast: unpacked, converted, packed again from the same values
    assert layer._packed is not packed and sum(b.nbytes for b in layer.buffers()) == 0
    assert torch.equal(layer.state_dict()["weight_fp16"], w.half())
    torch.testing.assert_close(layer(x), y, rtol=0, atol=0)


@needs_fbgemm
def test_fp16_many_rows_and_backward_unpack_the_packed_weight_once_per_call(monkeypatch):
    torch.manual_seed(0)
    layer = Fp16Linear.from_float(torch.randn(ROW_CHUNK + 64, 32))  # two row slices for the other schemes
    unpack, calls = torch.ops.quantized.linear_unpack_fp16, []
    monkeypatch.setattr(torch.ops.quantized, "linear_unpack_fp16", lambda packed: calls.append(1) or unpack(packed))
    x = torch.randn(KERNEL_MAX_ROWS + 10, 32, requires_grad=True)
    g = torch.randn(KERNEL_MAX_ROWS + 10, ROW_CHUNK + 64)
    y = layer(x)
    assert len(calls) == 1
    (y * g).sum().backward()
    assert len(calls) == 2
    weight = layer.dense_weight()
    assert rel_err(y.detach(), F.linear(x.detach(), weight)) < 1e-5 and rel_err(x.grad, g @ weight) < 1e-5


def test_fp16_embedding_keeps_its_rows_for_lookups():
    w = torch.randn(50, 16)
    with pytest.raises(ValueError, match="keep_rows=True"):
        QuantEmbedding(Fp16Linear.from_float(w))
    embedding = QuantEmbedding(Fp16Linear(w, keep_rows=True))
    tokens = torch.tensor([[3, 0, 49]])
    assert torch.equal(embedding(tokens), w.half().float()[tokens])
    assert torch.equal(embedding.weight, w.half()) and (embedding.head._packed is not None) == FBGEMM


def test_fp16w_base_decodes_fp32s_greedy_tokens(smollm):
    # built from the fp32 fixture's weights, which are what load_base(dtype="fp16w") rounds (the GGUF is not
    # read and dequantised again)
    base = smollm.base
    fp16w = build_llama(base.config, base.state_dict(), "fp16w", torch.device("cpu"), source="the fp32 base")
    assert isinstance(fp16w.layers[0].feed_forward.w1, Fp16Linear)
    assert isinstance(fp16w.tok_embeddings, QuantEmbedding)
    assert fp16w.tok_embeddings.weight.dtype == torch.float16  # the tied head is fp16, not int8
    if FBGEMM:
        assert fp16w.layers[0].feed_forward.w1.weight_fp16.numel() == 0  # only fbgemm's packed copy
    ids = [smollm.prompt_ids(q) for q in ("What is the capital of France?", "Name three colours.",
                                          "Why is the sky blue?")]
    answers = {}
    for name, model in (("fp32", base), ("fp16w", fp16w)):
        steps = decode_tokens(model, ids, None, Sampling(max_new_tokens=6), eos_ids=())  # prefill + 5 steps
        answers[name] = torch.stack(list(steps), 1)  # [3, 6]
    assert torch.equal(answers["fp16w"], answers["fp32"]), answers
