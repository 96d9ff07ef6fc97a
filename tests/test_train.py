"""Training: learning on a text task, the reference recipe, exact accumulation, the prefix cache, the
image pathway's feature cache, and a multimodal CLI run with bad records end to end.

Helpers here (a tiny base with a tokenizer, instruction records, a tiny open_clip tower directory,
drawn pictures) are imported by the other training test files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from conftest import save_tiny_hf  # noqa: E402
from mmadapter import AdapterConfig, VisionConfig, build_model, load_base  # noqa: E402
from mmadapter.adapter_file import load_adapter, read_adapter  # noqa: E402
from mmadapter.plot import read_log  # noqa: E402
from mmadapter.train import TrainConfig, Trainer, train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WORDS = ("apple river stone cloud maple tiger ocean piano candle forest silver rocket garden winter "
         "yellow purple").split()
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (235, 215, 30)}


# ----------------------------------------------------------------------------------------------
# Helpers shared by the training tests


def instruction_records(n: int, seed: int) -> list[dict]:
    """Alpaca records of a small synthetic task: a fixed answer style around words of the instruction."""
    rng = np.random.default_rng(seed)
    records = []
    for _ in range(n):
        a, b = rng.choice(WORDS, size=2, replace=False)
        records.append({"instruction": f"Combine {a} and {b}.", "output": f"Sure! {b} then {a}."})
    return records


def make_text_base(path: Path, seed: int = 0) -> Path:
    """A tiny random HF Llama (vocab 256) with a BPE tokenizer.json trained on the task's text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from mmadapter.data.templates import ALPACA_PROMPT_INPUT, ALPACA_PROMPT_NO_INPUT

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    texts = [ALPACA_PROMPT_NO_INPUT, ALPACA_PROMPT_INPUT, " ".join(WORDS), " ".join(COLOURS),
             "What color is this? 0123456789 .,:;!?'\"()[]{}#-_/\n",
             *(f"{r['instruction']} {r['output']}" for r in instruction_records(50, 99))]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=256, special_tokens=["<unk>", "<s>", "</s>"],
                                                        show_progress=False))
    save_tiny_hf(path, seed=seed)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                            "add_bos_token": True}))
    return path


def make_tower_dir(path: Path, seed: int = 0) -> Path:
    """A tiny open_clip ViT as a `local-dir:` folder (config + weights), usable from any process."""
    from test_vision import TINY_MODEL_CONFIGS, TINY_VIT, register_tiny_models, save_reference

    register_tiny_models(path.parent)
    path.mkdir(parents=True, exist_ok=True)
    save_reference(TINY_VIT, path / "open_clip_model.safetensors", seed=seed)
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_MODEL_CONFIGS[TINY_VIT],
                                                            "preprocess_cfg": {}}))
    return path


def draw_picture(path: Path, colour: str, rng: np.random.Generator) -> str:
    """A 32x32 picture: a large ellipse or rectangle of one colour, at a random place, on noisy grey."""
    img = Image.new("RGB", (32, 32), (128, 128, 128))
    w, h = rng.integers(20, 30, 2)
    x, y = rng.integers(0, 32 - w + 1), rng.integers(0, 32 - h + 1)
    draw = ImageDraw.Draw(img)
    (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([int(x), int(y), int(x + w), int(y + h)],
                                                             fill=COLOURS[colour])
    pixels = np.asarray(img).astype(np.int16) + rng.integers(-25, 26, (32, 32, 3))
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path)
    return str(path)


def quick_config(output_dir: Path, **overrides) -> TrainConfig:
    """Small, fast settings for tests."""
    values = dict(output_dir=str(output_dir), epochs=2, batch_size=4, lr=5e-2, warmup_epochs=1.0, save_every=0,
                  progress=False, plot=False)
    return TrainConfig(**{**values, **overrides})


def adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    return read_adapter(path)[1]


def subprocess_env() -> dict[str, str]:
    """One thread per process (the machine has two cores) and the repo importable."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models train fastest on one thread, and the equivalence tests need a fixed thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def text_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_text_base(tmp_path_factory.mktemp("text_base"))


@pytest.fixture(scope="module")
def tower_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tower_dir(tmp_path_factory.mktemp("towers") / "tiny_vit")


def multimodal_model(base: Path, tower: Path, seed: int = 0):
    vision = VisionConfig(model=f"local-dir:{tower}", pretrained=None, n_scales=2, projector_hidden=32)
    return build_model(str(base), AdapterConfig(n_prompts=4, n_layers=2), vision, seed=seed)


# ----------------------------------------------------------------------------------------------
# Learning


def test_text_training_lowers_held_out_loss_and_moves_gates(text_base: Path, tmp_path: Path) -> None:
    model = build_model(str(text_base), seed=0)
    prompts_before = model.adapter.prompts.detach().clone()
    config = quick_config(tmp_path / "run", epochs=4, batch_size=8, plot=True)
    result = train(model, instruction_records(96, 1), config, eval_data=instruction_records(32, 2))

    first, last = result.eval_losses[0], result.eval_losses[-1]
    assert len(result.eval_losses) == 5  # before training and after each of the 4 epochs
    assert last < first - 1.5, result.eval_losses
    assert float(model.adapter.gates.detach().abs().max()) > 0.1
    assert float((model.adapter.prompts.detach() - prompts_before).abs().max()) > 1e-2

    # What a user finds in output_dir.
    out = tmp_path / "run"
    records = read_log(out / "train_log.jsonl")
    train_records = [r for r in records if r["type"] == "train"]
    assert [r["step"] for r in train_records] == list(range(1, result.steps + 1)) and result.steps == 48
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "epoch"} <= set(train_records[-1])
    assert [r["epoch"] for r in records if r["type"] == "eval"] == [0, 1, 2, 3, 4]
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "config.json").read_text())["epochs"] == 4
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_data"]["samples"] == 96 and not summary["interrupted"]

    # The adapter file reproduces the trained model over a fresh base.
    meta, _ = read_adapter(result.adapter_path)
    assert meta.template == "alpaca" and meta.training["steps"] == 48 and meta.training["completed"]
    fresh = load_base(str(text_base))
    load_adapter(fresh, result.adapter_path)
    tokens = torch.tensor([model.prompt_ids("Combine apple and river.")])
    with torch.no_grad():
        torch.testing.assert_close(fresh(tokens), model(tokens), rtol=0, atol=0)


def test_gates_move_first_then_prompts(text_base: Path, tmp_path: Path) -> None:
    """Zero-init gating: step 1 gives the prompts zero gradient (only weight decay touches them)."""
    model = build_model(str(text_base), seed=0)
    config = quick_config(tmp_path, epochs=1, batch_size=4, warmup_epochs=0.0)
    trainer = Trainer(model, config)
    trainer.setup()
    data = trainer.prepare(instruction_records(8, 3))
    prompts0 = model.adapter.prompts.detach().clone()
    for group in trainer.optimizer.param_groups:
        group["lr"] = 0.05
    trainer.train_step(data, [[0, 1, 2, 3]])
    assert float(model.adapter.gates.detach().abs().min()) > 0
    decayed = prompts0 * (1 - 0.05 * config.weight_decay)  # AdamW's decoupled decay, nothing else
    torch.testing.assert_close(model.adapter.prompts.detach(), decayed, rtol=0, atol=0)
    trainer.train_step(data, [[4, 5, 6, 7]])
    assert float((model.adapter.prompts.detach() - decayed).abs().max()) > 1e-3


def test_gradient_accumulation_equals_one_large_batch(text_base: Path, tmp_path: Path) -> None:
    """Loss normalised by the labelled tokens of the whole step: 2 x 4 accumulated == 1 x 8."""
    records = instruction_records(8, 4)
    records[0]["output"] = "A much longer answer than the others, with more tokens to learn."
    adapters = []
    for groups in ([[0, 1, 2, 3, 4, 5, 6, 7]], [[0, 1, 2, 3], [4, 5, 6, 7]], [[0, 1], [2, 3, 4, 5, 6, 7]]):
        model = build_model(str(text_base), seed=0)
        trainer = Trainer(model, quick_config(tmp_path))
        trainer.setup()
        data = trainer.prepare(records)
        for group in trainer.optimizer.param_groups:
            group["lr"] = 0.05
        for _ in range(3):
            trainer.train_step(data, groups)
        adapters.append(model.adapter.state_dict())
    for other in adapters[1:]:
        for name in adapters[0]:
            torch.testing.assert_close(other[name], adapters[0][name], rtol=1e-4, atol=1e-5)


def test_loss_per_sample_counts_each_answer_once(text_base: Path, tmp_path: Path) -> None:
    """loss_per="sample": the step's loss is the mean over samples of each one's mean token loss, and its
    gradient is that mean's, so one long answer weighs no more than a one-word answer."""
    from mmadapter.data.encode import collate

    records = instruction_records(4, 5)
    records[0]["output"] = "A much longer answer than the others, with many more tokens to learn from."
    model = build_model(str(text_base), seed=0)
    with torch.no_grad():
        model.adapter.gates.fill_(0.3)
    trainer = Trainer(model, quick_config(tmp_path, loss_per="sample"))
    trainer.setup()
    data = trainer.prepare(records)
    assert len(set(data.label_counts)) > 1

    def token_mean_loss(indices: list[int]) -> torch.Tensor:
        batch = collate([data.samples[i] for i in indices], pad_id=model.tokenizer.pad_id)
        return model.loss(batch["tokens"], batch["labels"])

    params = [model.adapter.prompts, model.adapter.gates]
    reference = torch.stack([token_mean_loss([i]) for i in range(4)]).mean()
    expected_grads = torch.autograd.grad(reference, params)
    for group in trainer.optimizer.param_groups:
        group["lr"] = 0.0
    loss, _ = trainer.train_step(data, [[0, 1], [2, 3]])
    assert loss == pytest.approx(reference.item(), rel=1e-5)
    trainer.batch_loss(data, [0, 1, 2, 3]).div(4).backward()
    for p, expected in zip(params, expected_grads):
        torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-7)
    assert abs(token_mean_loss([0, 1, 2, 3]).item() - reference.item()) > 1e-3  # the averages differ here


# ----------------------------------------------------------------------------------------------
# The reference recipe


def reference_lr(epoch: float, lr: float, min_lr: float, warmup_epochs: float, epochs: int) -> float:
    """LLaMA-Adapter alpaca_finetuning_v1/util/lr_sched.py adjust_learning_rate (MAE's), verbatim math."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + np.cos(np.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))


def test_defaults_follow_the_reference_recipe(text_base: Path, tmp_path: Path) -> None:
    config = TrainConfig(output_dir=str(tmp_path))
    assert (config.beta1, config.beta2, config.weight_decay, config.epochs, config.warmup_epochs,
            config.max_seq_len, config.blr) == (0.9, 0.95, 0.02, 5, 2.0, 512, 9e-3)
    model = build_model(str(text_base), seed=0)
    assert model.adapter.n_layers == 2 and model.adapter.config.n_prompts == 10  # L = all but the bottom two
    trainer = Trainer(model, TrainConfig(output_dir=str(tmp_path), batch_size=6, grad_accum=4, min_lr=1e-4))
    trainer.setup()
    assert trainer.peak_lr() == pytest.approx(9e-3 * 24 / 256)
    for epoch in (0.0, 0.3, 1.99, 2.0, 2.7, 4.5, 4.999):
        assert trainer.learning_rate(epoch) == pytest.approx(reference_lr(epoch, 9e-3 * 24 / 256, 1e-4, 2.0, 5))
    decayed, plain = trainer.optimizer.param_groups
    assert decayed["weight_decay"] == 0.02 and plain["weight_decay"] == 0.0
    assert [trainer.param_names[p] for p in decayed["params"]] == ["prompts"]
    assert [trainer.param_names[p] for p in plain["params"]] == ["gates"]
    assert betas_of(trainer) == (0.9, 0.95)


def betas_of(trainer: Trainer) -> tuple[float, float]:
    return tuple(trainer.optimizer.param_groups[0]["betas"])


def test_config_rejects_bad_values_with_the_field_name() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="prefix_cache='ram'"):
        TrainConfig(prefix_cache="ram")
    with pytest.raises(ValueError, match="unknown TrainConfig option.*epoch"):
        TrainConfig.from_dict({"epoch": 3})
    with pytest.raises(ValueError, match="TrainConfig.lr: expected float"):
        TrainConfig.from_dict({"lr": "fast"})
    assert TrainConfig.from_dict({"lr": 1, "clip_grad": None}).lr == 1.0


# ----------------------------------------------------------------------------------------------
# Efficiency: prefix cache and image features


def test_prefix_cache_gives_the_same_adapter_and_the_tower_runs_once_per_image(
        text_base: Path, tower_dir: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pictures = [draw_picture(tmp_path / f"{i}.png", colour, rng) for i, colour in enumerate(COLOURS)]
    records = [{**r, "image": pictures[i % 4]} if i % 3 else r for i, r in enumerate(instruction_records(12, 5))]
    results = {}
    for mode in ("off", "memory", "disk"):
        model = multimodal_model(text_base, tower_dir)
        encoded = []
        model.vision.register_forward_hook(lambda _m, inputs, _o: encoded.append(inputs[0].shape[0]))
        config = quick_config(tmp_path / mode, epochs=3, prefix_cache=mode)
        result = train(model, records, config, eval_data=records[:4])
        assert sum(encoded) == 4, f"{mode}: the tower encoded {sum(encoded)} images for 4 unique ones"
        assert result.summary["feature_cache"]["tower_calls"] == 4
        results[mode] = (model.adapter.state_dict(), result.summary.get("prefix_cache"))
    reference, _ = results["off"]
    for mode in ("memory", "disk"):
        state, stats = results[mode]
        assert stats["hits"] > 0 and stats["stored_mb"] > 0, stats
        for name in reference:
            torch.testing.assert_close(state[name], reference[name], rtol=1e-5, atol=1e-6)
    assert any((tmp_path / "disk" / "prefix_cache").rglob("*.safetensors"))


def test_prefix_cache_bound_recomputes_beyond_it(text_base: Path, tmp_path: Path) -> None:
    model = build_model(str(text_base), seed=0)
    config = quick_config(tmp_path, epochs=2, prefix_cache="memory", prefix_cache_mb=0.02)  # a few samples
    result = train(model, instruction_records(16, 6), config)
    stats = result.summary["prefix_cache"]
    assert 0 < stats["stored_mb"] <= 0.02 and stats["rejected"] > 0 and stats["hits"] > 0


# ----------------------------------------------------------------------------------------------
# Multimodal through the CLI, with bad records


def test_cli_multimodal_run_counts_what_it_skips(text_base: Path, tower_dir: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    (tmp_path / "img").mkdir()
    names = list(COLOURS)
    lines = [json.dumps({"question": "What color is this?", "answer": names[i % 4],
                         "image": f"img/{i}.png"}) for i in range(8)]
    for i in range(8):
        draw_picture(tmp_path / "img" / f"{i}.png", names[i % 4], rng)
    (tmp_path / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    lines += [
        '{"question": "a line cut off in the midd',  # not JSON
        json.dumps({"question": "no answer field"}),  # malformed record
        json.dumps({"question": "What color is this?", "answer": "red", "image": "img/missing.png"}),
        json.dumps({"question": "What color is this?", "answer": "red", "image": "img/broken.png"}),
        json.dumps({"instruction": "Say a lot.", "output": " ".join(WORDS * 20)}),  # over-long
        json.dumps({"instruction": "Combine apple and river.", "output": "Sure! river then apple."}),  # text-only
    ]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(lines) + "\n")
    (tmp_path / "run.yaml").write_text("epochs: 2\nbatch_size: 4\nlr: 0.05\nmax_seq_len: 64\nsave_every: 2\n")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "mmadapter", "train", "--config", str(tmp_path / "run.yaml"),
           "--base", str(text_base), "--vision", f"local-dir:{tower_dir}",
           "--vision-scales", "2", "--n-layers", "2", "--data", str(data), "--output-dir", str(out),
           "--epochs", "3", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]

    summary = json.loads((out / "summary.json").read_text())
    data_summary = summary["train_data"]
    assert data_summary["records"] == 14 and data_summary["samples"] == 10
    assert data_summary["skipped"] == {"bad JSON line": 1, "missing field 'answer'": 1, "missing image": 1,
                                       "unreadable image": 1}
    assert data_summary["truncated"] == 1 and data_summary["images"] == 8
    assert "unreadable image" in proc.stderr and "1 truncated" in proc.stderr  # the printed summary
    assert summary["steps"] == 9 and summary["epochs"] == 3  # flags override the config file's epochs
    assert summary["feature_cache"]["tower_calls"] == 8  # the broken file fails to decode, before the tower

    meta, tensors = read_adapter(out / "adapter.safetensors")
    assert {"projector.fc1.weight", "projector.fc2.weight"} <= set(tensors)
    assert meta.vision.model == f"local-dir:{tower_dir}" and meta.training["steps"] == 9
    assert (out / "loss_curve.png").is_file()
    assert json.loads((out / "config.json").read_text())["vision"] == f"local-dir:{tower_dir}"
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000009"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-00000008", "step-00000009"]


# ----------------------------------------------------------------------------------------------
# Other sources and precisions


def write_scienceqa(root: Path) -> None:
    """A tiny original-layout release: train pids 1-4 (1 and 3 name images, 3's file is missing), val 5-6."""
    problems = {}
    for i in range(6):
        pid, split = str(i + 1), "train" if i < 4 else "val"
        problems[pid] = {"question": f"Which word is {WORDS[i]}?", "choices": [WORDS[i + 1], WORDS[i]],
                         "answer": 1, "hint": "A word game." if i % 3 else "", "image": "image.png" if i % 2 == 0 else None,
                         "subject": "language science", "grade": "grade2", "lecture": "", "solution": "",
                         "split": split}
    (root / "problems.json").write_text(json.dumps(problems))
    (root / "pid_splits.json").write_text(json.dumps({"train": ["1", "2", "3", "4"], "val": ["5", "6"]}))
    rng = np.random.default_rng(3)
    for split, pid in (("train", "1"), ("val", "5")):
        (root / "images" / split / pid).mkdir(parents=True)
        draw_picture(root / "images" / split / pid / "image.png", "red", rng)


def test_scienceqa_source_uses_the_official_prompt_and_images(text_base: Path, tower_dir: Path,
                                                              tmp_path: Path) -> None:
    from mmadapter.data.scienceqa import build_prompt, build_target, load_scienceqa
    from mmadapter.train_data import read_training_source

    root = tmp_path / "scienceqa"
    root.mkdir()
    write_scienceqa(root)
    source = f"scienceqa:{root}"
    config = quick_config(tmp_path / "run", template="plain", epochs=2)
    examples, _ = read_training_source(source, config, "plain")
    first = load_scienceqa(root, "train")[0][0]
    assert examples[0].turns == [(build_prompt(first), " " + build_target(first))]  # prompt + " " + target
    assert examples[0].image == str(root / "images" / "train" / "1" / "image.png")

    result = train(multimodal_model(text_base, tower_dir), source, config, eval_data=source)
    data = result.summary["train_data"]
    assert (data["records"], data["samples"], data["samples_with_image"]) == (4, 3, 1)
    assert data["skipped"] == {"missing image": 1}
    assert len(result.eval_losses) == 3  # val split: before training and after each epoch


def test_bf16_base_and_autocast_keep_trainable_state_fp32(text_base: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    model = build_model(str(text_base), dtype=torch.bfloat16, seed=0)
    result = train(model, instruction_records(16, 3), quick_config(tmp_path, precision="bf16"))
    assert model.base.tok_embeddings.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.adapter.parameters())
    state = load_file(tmp_path / "checkpoints" / "step-00000008" / "optimizer.safetensors")
    assert state["state.prompts.exp_avg"].dtype == torch.float32 and np.isfinite(result.final_loss)
