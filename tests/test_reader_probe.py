"""The question-conditioned tower probe: questions, cached features, readers that discriminate, the CLI."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mmadapter.config import VisionConfig  # noqa: E402
from mmadapter.data import shapes  # noqa: E402
from mmadapter.demo import reader_probe  # noqa: E402
from mmadapter.demo.probe import IMAGE_SIZE  # noqa: E402
from mmadapter.demo.reader_probe import (ANSWERS, QUESTION_TYPES, TEMPLATES, ProbeSet, ProbeTraining,  # noqa: E402
                                         TowerFeatures, cache_features, encode_question, make_reader,
                                         standardised, train_reader)
from mmadapter.demo.readers import AttentionRead  # noqa: E402
from mmadapter.vision import VisionTower  # noqa: E402

RANDOM_TOWER = VisionConfig(model="ShapesCLIP-64", pretrained=None)  # the demo architecture, random weights


def test_every_generated_question_but_captions_is_read() -> None:
    seen = set()
    for i in range(200):
        for qa in shapes.questions(shapes.make_scene("val", i)):
            if qa.kind == "caption":
                with pytest.raises(ValueError, match="not a question the reader probe knows"):
                    encode_question(qa.question)
                continue
            template, colour, shape = encode_question(qa.question)
            seen.add(template)
            text = TEMPLATES[template][0].format(color=list(shapes.COLORS)[colour - 1] if colour else "",
                                                 shape=shapes.SHAPES[shape - 1] if shape else "")
            assert text == qa.question.lower()  # the ids say exactly which question it was
            assert qa.answer in ANSWERS
    assert seen == set(range(len(TEMPLATES)))
    assert encode_question("How many circles are there?") == (QUESTION_TYPES.index("count-shape"), 0, 1)
    assert encode_question("What shape is the object closest to the gray object?") == (
        QUESTION_TYPES.index("closest"), 6, 0)


def test_attention_read_is_torch_multihead_attention() -> None:
    """The reference reads the tokens with a one-hot position appended: its key and value projections'
    extra columns are then the position embeddings."""
    torch.manual_seed(0)
    n_tokens = 9
    read = AttentionRead(width=32, token_dim=24, n_tokens=n_tokens, heads=4)
    reference = torch.nn.MultiheadAttention(32, 4, kdim=24 + n_tokens, vdim=24 + n_tokens, batch_first=True)
    with torch.no_grad():
        reference.q_proj_weight.copy_(read.q_proj.weight)
        reference.k_proj_weight.copy_(torch.cat([read.k_proj.weight, read.key_position.T], dim=1))
        reference.v_proj_weight.copy_(torch.cat([read.v_proj.weight, read.value_position.T], dim=1))
        # any key bias: it shifts every token's score by the same amount
        reference.in_proj_bias.copy_(torch.cat([read.q_proj.bias, torch.randn(32), read.v_proj.bias]))
        reference.out_proj.load_state_dict(read.out_proj.state_dict())
    query, tokens = torch.randn(5, 32), torch.randn(5, n_tokens, 24)
    with_position = torch.cat([tokens, torch.eye(n_tokens).expand(5, -1, -1)], dim=-1)  # [B, T, E + T]
    expected, _ = reference(query.unsqueeze(1), with_position, with_position)
    torch.testing.assert_close(read(query, tokens), expected.squeeze(1), atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def tower() -> TowerFeatures:
    return TowerFeatures(RANDOM_TOWER)


def test_features_are_the_adapters_cached_and_resumed(tower, tmp_path, monkeypatch) -> None:
    featurised = []
    original = reader_probe.featurise_scenes
    monkeypatch.setattr(reader_probe, "featurise_scenes",
                        lambda f, scenes: featurised.append(len(scenes)) or original(f, scenes))
    global_features, tokens = cache_features(tower, tmp_path, "test", 10, progress=False, chunk_size=4)
    assert featurised == [4, 4, 2]
    files = sorted(tmp_path.iterdir())
    assert [f.name for f in files] == ["test-000000-000004.safetensors", "test-000004-000008.safetensors",
                                      "test-000008-000010.safetensors"]

    # what the adapter's towers give for the same pictures
    images = [shapes.render(shapes.make_scene("test", i), IMAGE_SIZE) for i in range(10)]
    mlp_tower = VisionTower(RANDOM_TOWER)
    token_tower = VisionTower(VisionConfig(model="ShapesCLIP-64", pretrained=None, projector="visual-query"))
    torch.testing.assert_close(global_features, mlp_tower(mlp_tower.preprocess_batch(images)))
    assert tokens.shape == (10, 65, 128)  # 8 x 8 patches + the class token, 128 wide after proj
    torch.testing.assert_close(tokens.flatten(1), token_tower(token_tower.preprocess_batch(images)))

    # read back without the tower; a lost chunk is computed again, alone
    stamps = {f.name: f.stat().st_mtime_ns for f in files}
    (tmp_path / "test-000004-000008.safetensors").unlink()
    featurised.clear()
    again = cache_features(tower, tmp_path, "test", 10, progress=False, chunk_size=4)
    assert featurised == [4]
    for name in ("test-000000-000004.safetensors", "test-000008-000010.safetensors"):
        assert (tmp_path / name).stat().st_mtime_ns == stamps[name]
    torch.testing.assert_close(again[0], global_features)
    torch.testing.assert_close(again[1], tokens)

    other = TowerFeatures(VisionConfig(model="ShapesCLIP-64", pretrained=None, seed=1))
    with pytest.raises(ValueError, match="features of another tower"):
        cache_features(other, tmp_path, "test", 10, progress=False, chunk_size=4)


def planted_set(n_scenes: int, seed: int, n_colours: int = 2) -> ProbeSet:
    """Left/right of each colour planted in one token: colour c's answer is the sign of feature 0 of
    token c + 1 (of 8). Every scene has as many lefts as rights, so the mean over tokens (the 'global'
    feature here) says nothing about any one colour's answer."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(n_scenes, 8, 16, generator=g)  # [S, T, E]
    rows = []
    for s in range(n_scenes):
        lefts = torch.randperm(n_colours, generator=g)[:n_colours // 2].tolist()
        for c in range(n_colours):
            left = c in lefts
            tokens[s, c + 1, 0] = (3.0 if left else -3.0) + 0.3 * torch.randn((), generator=g)
            rows.append((s, QUESTION_TYPES.index("left-right"), c + 1, 0, ANSWERS.index("left" if left else "right")))
    return ProbeSet(tokens.mean(1), tokens, torch.tensor(rows))


def test_token_reader_finds_planted_positional_answers_the_global_reader_cannot() -> None:
    train, test = standardised(planted_set(1000, seed=0), planted_set(300, seed=1))
    training = ProbeTraining(steps=400, lr=5e-3, seed=0)
    accuracy = {}
    for name in ("global", "tokens"):
        torch.manual_seed(0)
        accuracy[name] = train_reader(make_reader(name, train), train, test, training, progress=False)["left-right"]
    assert accuracy["tokens"] >= 95, accuracy
    assert accuracy["global"] <= 60, accuracy  # chance is 50


def test_cli_end_to_end(tmp_path, capsys) -> None:
    out, result = tmp_path / "probe", tmp_path / "result.json"
    reader_probe.main(["--tower", "ShapesCLIP-64:none", "--out", str(out), "--train-scenes", "12",
                       "--test-scenes", "6", "--steps", "3", "--json", str(result), "--no-progress"])
    printed = capsys.readouterr().out
    assert "| question type | test questions | blind | global | tokens | tokens-x2 |" in printed
    results = json.loads(result.read_text())
    assert results == json.loads((out / "reader_probe.json").read_text())
    assert set(results["accuracy"]) == {"blind", "global", "tokens", "tokens-x2"}
    assert results["train_scenes"] == 12 and results["training"]["steps"] == 3
    for reader, table in results["accuracy"].items():
        assert set(table) <= set(QUESTION_TYPES) and all(0 <= v <= 100 for v in table.values()), reader
    assert sorted(p.name for p in (out / "features").iterdir()) == ["test-000000-000006.safetensors",
                                                                   "val-000000-000012.safetensors"]


def test_cli_rejects_unknown_readers(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit):
        reader_probe.main(["--out", str(tmp_path), "--readers", "global,eyes"])
    assert "unknown reader 'eyes'" in capsys.readouterr().err
