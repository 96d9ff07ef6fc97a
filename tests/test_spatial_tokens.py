"""Spatial image tokens (VisionConfig(projector="spatial")): token k reaches prompt k only, the grid is
adaptive average pooling, files reload in a new process, they batch with V1 adapters, they train with the
feature cache, a token count other than n_prompts is refused, and the tokens carry place.

All on a tiny random open_clip ViT (32 px, 8 px patches: a 4x4 patch grid, 4 blocks) over a tiny base.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from test_train import (COLOURS, draw_picture, one_thread, quick_config,  # noqa: F401 (fixtures: one_thread is
                        subprocess_env, text_base, tower_dir)  # autouse; text_base and tower_dir are used by name)

from mmadapter import AdapterConfig, VisionConfig
from mmadapter.adapter import Adapter
from mmadapter.adapter_file import load_adapter, read_adapter, save_adapter
from mmadapter.batching import BatchEngine
from mmadapter.commands.info import describe
from mmadapter.commands.train import ModelOptions, build_training_model, check_inputs
from mmadapter.config import TrainConfig
from mmadapter.model import build_model, load_base
from mmadapter.spatial_tokens import SpatialTokens, build_spatial_tokens
from mmadapter.train import train
from mmadapter.train_log import model_options
from mmadapter.vision import VisionTower

GRID, K = 2, 5  # a 2x2 grid of regions + the class token


def spatial(tower: Path, grid: int | None = GRID, depth: int | None = None) -> VisionConfig:
    return VisionConfig(model=f"local-dir:{tower}", pretrained=None, projector="spatial", spatial_grid=grid,
                        token_depth=depth, projector_hidden=16)


def spatial_model(base: Path, tower: Path, n_layers: int = 3, seed: int = 0, **vision):
    model = build_model(str(base), AdapterConfig(n_prompts=K, n_layers=n_layers), spatial(tower, **vision), seed=seed)
    with torch.no_grad():  # open gates and a louder image, so that the image changes what the model says
        model.adapter.gates.normal_(0, 1, generator=torch.Generator().manual_seed(seed))
        model.adapter.projector.fc2.weight.mul_(20)
    return model


def picture(colour: str, box: tuple[int, int, int, int] | None = None, size: int = 32) -> Image.Image:
    """A grey picture, with one square of `colour` at box (x0, y0, x1, y1), or noise all over."""
    img = Image.new("RGB", (size, size), (128, 128, 128))
    ImageDraw.Draw(img).rectangle(box or (4, 6, 25, 27), fill=COLOURS[colour])
    return img


# ----------------------------------------------------------------------------------------------
# (1) token k reaches prompt k only


def test_image_token_k_moves_only_prompt_k_in_every_layer(text_base, tower_dir):
    model = spatial_model(text_base, tower_dir)
    projector = model.adapter.projector
    assert isinstance(projector, SpatialTokens) and projector.n_tokens == K
    with torch.no_grad():
        features, has_image = model.image_features([picture("red")])
        plain = model.adapter_kv(None)
        reference = model.adapter_kv(features, has_image)
        assert len(reference.kv) == 3
        for (k0, v0), (k1, v1) in zip(plain.kv, reference.kv):  # the image moves every prompt's K and V
            assert (k0 - k1).abs().amax(dim=(0, 1, 3)).min() > 0 and (v0 - v1).abs().amax(dim=(0, 1, 3)).min() > 0
        for k in range(K):
            def bump(_module, _inputs, tokens, k=k):  # image token k only: [B, K, C]
                tokens = tokens.clone()
                tokens[:, k] += 0.5
                return tokens

            handle = projector.register_forward_hook(bump)
            try:
                moved = model.adapter_kv(features, has_image)
            finally:
                handle.remove()
            others = [j for j in range(K) if j != k]
            for layer, (before, after) in enumerate(zip(reference.kv, moved.kv)):
                for a, b in zip(before, after):  # K then V: [B, G, K, d]
                    assert torch.equal(a[:, :, others], b[:, :, others]), f"token {k} reached other prompts in {layer}"
                    assert not torch.allclose(a[:, :, k], b[:, :, k]), f"token {k} missed prompt {k} in {layer}"


def test_tokens_start_at_a_fifth_of_the_prompts_scale(text_base, tower_dir):
    """The scale spatial_tokens.py documents: about 0.2 per coordinate at init, prompts N(0, 1)."""
    model = build_model(str(text_base), AdapterConfig(n_prompts=K, n_layers=2), spatial(tower_dir), seed=0)
    with torch.no_grad():
        features, _ = model.image_features([picture(c) for c in COLOURS])
        rms = float(model.adapter.image_tokens(features).pow(2).mean().sqrt())
    assert 0.1 < rms < 0.4, rms
    assert not model.adapter.projector.position.detach().any()  # position embedding: zero at init


# ----------------------------------------------------------------------------------------------
# (2) the grid is adaptive average pooling of the patch grid


def test_grid_regions_are_average_pools_of_the_patches():
    side, e = 4, 3
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    patches = torch.stack([rows * 10 + cols, rows * rows, cols * cols * cols], dim=-1).float()  # [s, s, E]
    cls = torch.tensor([[7.0, -1.0, 3.0]])
    tokens = torch.cat([cls, patches.reshape(side * side, e)])[None].repeat(2, 1, 1)  # [2, 17, E], row-major
    tokens[1] *= -2  # a second image
    for grid in (1, 2, 3, 4, None):
        vision = VisionConfig(projector="spatial", spatial_grid=grid, clip_dim=e, projector_hidden=8)
        n = 1 + (grid or side) ** 2
        projector = build_spatial_tokens(vision, (1 + side * side) * e, 6, n)
        regions = projector.regions(tokens.flatten(1))  # [2, n, E]
        assert regions.shape == (2, n, e)
        torch.testing.assert_close(regions[:, 0], tokens[:, 0], rtol=0, atol=0)  # the class token, first
        g = grid or side
        grid_of = tokens[:, 1:].reshape(2, side, side, e)
        for r in range(g):
            for c in range(g):  # adaptive pooling's bins: [floor(i s / g), ceil((i + 1) s / g))
                r0, r1 = r * side // g, -(-(r + 1) * side // g)
                c0, c1 = c * side // g, -(-(c + 1) * side // g)
                expected = grid_of[:, r0:r1, c0:c1].mean(dim=(1, 2))
                torch.testing.assert_close(regions[:, 1 + r * g + c], expected)
    two = build_spatial_tokens(VisionConfig(projector="spatial", spatial_grid=2, clip_dim=e), 17 * e, 6, 5)
    means = two.regions(tokens.flatten(1))[0, 1:, 0]  # rows*10 + cols averaged over each 2x2 quadrant
    assert means.tolist() == [5.5, 7.5, 25.5, 27.5]  # top-left, top-right, bottom-left, bottom-right


# ----------------------------------------------------------------------------------------------
# (3) save, then reload in a new process: the same logits


RELOAD = """
import sys, torch
from safetensors.torch import save_file
from mmadapter.adapter_file import load_adapter
from mmadapter.model import load_base
torch.set_num_threads(1)
base, adapter, image, out = sys.argv[1:5]
model = load_base(base)
load_adapter(model, adapter)
ids = torch.tensor([model.prompt_ids("What color is this?")])
with torch.no_grad():
    features, has_image = model.image_features([image])
    save_file({"logits": model(ids, features, has_image).contiguous()}, out)
"""


def test_saved_adapter_reloads_in_a_new_process_with_the_same_logits(text_base, tower_dir, tmp_path):
    model = spatial_model(text_base, tower_dir, depth=3)
    with torch.no_grad():
        model.adapter.projector.position.normal_(0, 0.3)
    image = tmp_path / "red.png"
    picture("red").save(image)
    path = save_adapter(model, tmp_path / "spatial.safetensors")
    ids = torch.tensor([model.prompt_ids("What color is this?")])
    with torch.no_grad():
        features, has_image = model.image_features([str(image)])
        logits = model(ids, features, has_image)
        text_only = model(ids)
    assert not torch.allclose(logits, text_only)  # the image matters

    meta, _ = read_adapter(path)
    assert (meta.vision.projector, meta.vision.spatial_grid, meta.vision.token_depth) == ("spatial", GRID, 3)
    assert meta.vision.clip_dim == 32 and meta.feature_dim == 17 * 32
    info = describe(path)
    assert info["variant"] == "LLaMA-Adapter multimodal (spatial tokens)"
    assert info["image_tokens"] == "spatial tokens: 5 tokens from a 2\u00d72 grid at depth 3 (class token first)"

    out = tmp_path / "logits.safetensors"
    subprocess.run([sys.executable, "-c", RELOAD, str(text_base), str(path), str(image), str(out)],
                   check=True, env=subprocess_env(), timeout=300)
    assert torch.equal(load_file(out)["logits"], logits)

    again = load_base(str(text_base))  # and in this process: the metadata rebuilds the same projector
    loaded = load_adapter(again, path)
    assert loaded.vision_config.spatial_grid == GRID and again.vision.fingerprint.split(":")[-2] == "tokens@3"
    assert save_adapter(again, tmp_path / "again.safetensors").read_bytes() == path.read_bytes()


# ----------------------------------------------------------------------------------------------
# (4) in one batch with a V1 adapter


def test_spatial_and_v1_requests_batch_together_and_get_what_they_get_alone(text_base, tower_dir):
    model = spatial_model(text_base, tower_dir, n_layers=2)
    spatial_adapter = model.adapter
    v1_tower = VisionTower(VisionConfig(model=f"local-dir:{tower_dir}", pretrained=None, n_scales=2,
                                        projector_hidden=16))
    torch.manual_seed(1)
    v1 = Adapter(AdapterConfig(n_prompts=K, n_layers=3), model.base.config, v1_tower.config, v1_tower.feature_dim)
    v1.use_tower(v1_tower)
    other_k = Adapter(AdapterConfig(n_prompts=3, n_layers=2), model.base.config, v1_tower.config,
                      v1_tower.feature_dim)  # another prompt count: waits until the batch drains
    other_k.use_tower(v1_tower)
    with torch.no_grad():
        for adapter in (v1, other_k):
            adapter.gates.normal_(0, 1, generator=torch.Generator().manual_seed(2))
            adapter.projector.fc2.weight.mul_(20)
    red, blue = picture("red"), picture("blue", (2, 2, 14, 30))
    requests = [("What color is this?", red, spatial_adapter), ("What color is this?", blue, v1),
                ("What color is this?", blue, spatial_adapter), ("What color is this?", red, other_k)]
    n_new = 24
    alone = [model.generate(p, image, adapter=a, max_new_tokens=n_new) for p, image, a in requests]
    assert alone[0] != alone[2]  # the image changes the spatial adapter's answer: a mix-up would show

    engine = BatchEngine(model, max_batch=4, max_slots=256)
    results: list[str | None] = [None] * len(requests)

    def run(i: int) -> None:
        prompt, image, adapter = requests[i]
        results[i] = "".join(engine.stream(prompt, image, adapter=adapter, max_new_tokens=n_new))

    first = threading.Thread(target=run, args=(0,))
    first.start()
    while engine.steps < 1 and first.is_alive():  # the spatial request decodes: the others join its batch
        threading.Event().wait(0.005)
    others = [threading.Thread(target=run, args=(i,)) for i in (1, 2, 3)]
    for t in others:
        t.start()
    for t in [first, *others]:
        t.join(timeout=300)
    assert results == alone
    assert engine.peak_rows == 3  # the three with K = 5 decoded together; the K = 3 one after them


def test_app_serves_a_spatial_and_a_v1_adapter_from_files(text_base, tower_dir, tmp_path):
    """`serve --adapter spatial.safetensors` beside a V1 file: each answers as it does alone."""
    import argparse

    from mmadapter.app.serve import add_serve_args, build_service

    folder = tmp_path / "adapters"
    folder.mkdir()
    model = spatial_model(text_base, tower_dir)
    save_adapter(model, tmp_path / "spatial.safetensors")
    v1_model = build_model(str(text_base), AdapterConfig(n_prompts=K, n_layers=2),
                           VisionConfig(model=f"local-dir:{tower_dir}", pretrained=None, n_scales=2,
                                        projector_hidden=16), seed=1)
    with torch.no_grad():
        v1_model.adapter.gates.fill_(0.7)
        v1_model.adapter.projector.fc2.weight.mul_(20)
    save_adapter(v1_model, folder / "v1.safetensors")
    image = tmp_path / "red.png"
    picture("red").save(image)

    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    service = build_service(parser.parse_args(["--base", str(text_base), "--adapter",
                                               str(tmp_path / "spatial.safetensors"), "--adapters-dir", str(folder),
                                               "--no-demo", "--max-batch", "4"]))
    assert "`spatial` (LLaMA-Adapter multimodal (spatial tokens))" in service.status_markdown()
    for name, reference in (("spatial", model), ("v1", v1_model)):
        reply = list(service.answer("What color is this?", str(image), [], name, max_new_tokens=16))[-1]
        assert reply.text == reference.generate("What color is this?", image=str(image), max_new_tokens=16), name


# ----------------------------------------------------------------------------------------------
# (5) training, with the feature cache


def test_training_moves_projector_and_gates_and_encodes_each_image_once(text_base, tower_dir, tmp_path):
    rng = np.random.default_rng(0)
    pictures = [draw_picture(tmp_path / f"{i}.png", colour, rng) for i, colour in enumerate(COLOURS)]
    records = [{"question": "What color is this?", "answer": colour, "image": pictures[i]}
               for i, colour in enumerate(COLOURS)] * 2
    model = build_model(str(text_base), AdapterConfig(n_prompts=K, n_layers=2), spatial(tower_dir), seed=0)
    before = {k: v.clone() for k, v in model.adapter.state_dict().items()}
    encoded = []
    model.vision.register_forward_hook(lambda _m, inputs, _o: encoded.append(inputs[0].shape[0]))
    result = train(model, records, quick_config(tmp_path / "run", epochs=2, feature_cache_dir=str(tmp_path / "f")))
    assert sum(encoded) == 4 and result.summary["feature_cache"]["tower_calls"] == 4
    after = model.adapter.state_dict()
    for name in ("gates", "projector.norm.weight", "projector.fc1.weight", "projector.fc2.weight",
                 "projector.position"):
        assert not torch.equal(before[name], after[name]), f"{name} did not train"
    assert any((tmp_path / "f").rglob("*.safetensors"))
    saved = json.loads((tmp_path / "run" / "config.json").read_text())  # `train --config` repeats the run
    assert (saved["projector"], saved["spatial_grid"], saved["token_depth"]) == ("spatial", GRID, 4)


def test_cli_options_build_a_spatial_model(text_base, tower_dir):
    options = ModelOptions(base=str(text_base), vision=f"local-dir:{tower_dir}", projector="spatial",
                           spatial_grid=GRID, token_depth=2, n_prompts=K, n_layers=2, projector_hidden=16)
    model = build_training_model(options, seed=0)
    assert isinstance(model.adapter.projector, SpatialTokens) and model.vision.take_indices == [1]
    assert model_options(model)["token_depth"] == 2
    with pytest.raises(ValueError, match="pass --vision too"):
        check_inputs(ModelOptions(projector="spatial", spatial_grid=GRID), TrainConfig(data=__file__))


# ----------------------------------------------------------------------------------------------
# (6) bad settings: clear errors


def test_token_count_other_than_n_prompts_is_refused_with_the_k_to_use(text_base, tower_dir):
    with pytest.raises(ValueError, match=r"5 image tokens \(the class token \+ a 2x2 grid\).*n_prompts=10; "
                                         r"use n_prompts=5"):
        build_model(str(text_base), AdapterConfig(n_prompts=10, n_layers=2), spatial(tower_dir))
    with pytest.raises(ValueError, match="17 image tokens .*one per patch.* use n_prompts=17"):
        build_model(str(text_base), AdapterConfig(n_prompts=5, n_layers=2), spatial(tower_dir, grid=None))
    with pytest.raises(ValueError, match="spatial_grid=5: the tower has a 4x4 patch grid"):
        build_model(str(text_base), AdapterConfig(n_prompts=26, n_layers=2), spatial(tower_dir, grid=5))
    with pytest.raises(ValueError, match="token_depth=5 exceeds the tower's 4 transformer blocks"):
        VisionTower(spatial(tower_dir, depth=5))
    with pytest.raises(ValueError, match="spatial_grid=2 is an option of projector='spatial'"):
        VisionConfig(spatial_grid=2)
    with pytest.raises(ValueError, match="projector='spatial-tokens': use one of mlp, visual-query, spatial"):
        VisionConfig(projector="spatial-tokens")
    with pytest.raises(ValueError, match="spatial_grid=0 must be a positive integer"):
        VisionConfig(projector="spatial", spatial_grid=0)


# ----------------------------------------------------------------------------------------------
# (7) place: which token changes most follows where the object is


@pytest.mark.parametrize("box, region", [((1, 1, 13, 13), 1), ((19, 1, 31, 13), 2),
                                         ((1, 19, 13, 31), 3), ((19, 19, 31, 31), 4)])
def test_the_token_of_the_objects_region_changes_most(text_base, tower_dir, box, region):
    model = build_model(str(text_base), AdapterConfig(n_prompts=K, n_layers=2), spatial(tower_dir), seed=0)
    with torch.no_grad():
        features, _ = model.image_features([Image.new("RGB", (32, 32), (128, 128, 128)), picture("red", box)])
        tokens = model.adapter.image_tokens(features)  # [2, K, C]
    change = (tokens[1] - tokens[0]).norm(dim=-1)  # [K]
    assert int(change[1:].argmax()) + 1 == region, change.tolist()
