"""The benchmark scripts run end to end on tiny inputs (their numbers are for bench/, not for tests)."""

import json

import pytest

pytest.importorskip("transformers")


def test_gpu_script_runs_on_cpu_with_a_tiny_preset(tmp_path, monkeypatch):
    """The GPU check can only be timed on a GPU; here its code path runs once, so a lent GPU never meets a bug."""
    from bench import common, gpu

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    markdown = gpu.run("cpu", preset="tiny")
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert [row[0] for row in result["rows"]] == ["decode batch 1, base", "decode batch 1, adapter K=10, L=2",
                                                  "train step 8 x 256"]
    assert "tokens/s" in result["rows"][0][1] and float(result["rows"][0][1].split()[0]) > 0
    assert "MFU peak unknown" in result["rows"][2][2]  # no peak FLOP/s is known for a CPU
    assert markdown.startswith("### CPU: tiny shape")


def test_epoch_lengths_follow_the_documented_distribution():
    """The synthetic Alpaca-like lengths: medians near the documented ones, nothing past the 512 cap."""
    from bench.epoch import MAX_LEN, synthetic_lengths

    lengths = synthetic_lengths(2000)
    prompts = sorted(p for p, _ in lengths)
    responses = sorted(r for _, r in lengths)
    assert all(p + r <= MAX_LEN for p, r in lengths)
    assert 60 <= prompts[1000] <= 80  # 41-token preamble + median 18 instruction + inputs in 40% of samples
    assert 50 <= responses[1000] <= 70  # median 60


def test_matvec_kernels_all_compute_the_same_product():
    """The packed-weight kernels bench/matvec.py times are PyTorch internals: each must still give x Wᵀ."""
    import torch

    from bench.matvec import kernels

    weights = [torch.randn(64, 48), torch.randn(30, 64)]
    products = kernels(weights)
    for i, w in enumerate(weights):
        x = torch.randn(1, w.shape[1])
        for name, product in products.items():
            torch.testing.assert_close(product(x, i), x @ w.t(), rtol=1e-4, atol=1e-4, msg=name)


def test_quantised_candidates_compute_the_quantised_product():
    """Every candidate bench/quant_kernels.py times computes x Wᵀ of its quantised W (the compiled ones
    included), so the table compares kernels that do the same work."""
    import torch
    import torch.nn.functional as F

    from bench.quant_kernels import candidates
    from mmadapter.quant import Int4Linear, Int8Linear

    torch.manual_seed(0)
    weights = [torch.randn(64, 96) * 0.05]
    products, compile_s = candidates(weights)
    x = torch.randn(1, 96)
    exact = {"fp32": F.linear(x, weights[0]), "fp16": F.linear(x, weights[0].half().float()),
             "int8": F.linear(x, Int8Linear.from_float(weights[0]).dense_weight()),
             "4-bit": F.linear(x, Int4Linear.from_float(weights[0]).dense_weight())}
    if "fbgemm" in torch.backends.quantized.supported_engines:
        assert {"int8 fbgemm dynamic, fp32 x", "fp16 fbgemm, fp32 x"} <= set(products)
    for name, product in products.items():
        ref = exact[name.split()[0]]
        # bf16 activations round x; fbgemm's dynamic int8 quantises x to 7 bits per tensor (~1.5% on a Gaussian row)
        tolerance = 0.01 if "bf16" in name else 0.03 if "dynamic" in name else 1e-4
        assert float((product(x, 0) - ref).norm() / ref.norm()) < tolerance, name
    assert set(compile_s) == {"int8 compiled, fp32 x", "4-bit compiled, fp32 x"}
