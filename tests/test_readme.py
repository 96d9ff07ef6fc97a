"""The README's Python and training blocks, run as written — twice, in one directory — against tiny stand-ins.

Stand-ins (so the whole file runs in seconds on a CPU, offline): the embedded SmolLM2 and `/models/llama-7b`
become a tiny random base with a tokenizer, the ViT-L-14 `openai` tower a tiny `local-dir:` tower, the data
files small generated ones; CLI training lines get `--base <tiny> --epochs 1 --n-layers 2` and no progress bar.
Blocks covered elsewhere are listed in `ELSEWHERE` (the test fails when a new block is neither run nor listed).
"""

from __future__ import annotations

import builtins
import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from test_train import draw_picture, instruction_records, make_text_base, make_tower_dir, one_thread  # noqa: F401

from mmadapter.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"

# The first command of blocks that other tests run, and where.
ELSEWHERE = {
    "make demo": "the Makefile itself; the app in tests/test_app.py",
    "python eval/scienceqa.py --adapter": "tests/test_scienceqa_eval.py (CLI and resume)",
    "mmadapter eval vqa --adapter": "tests/test_vqa_eval.py (every input format, the script, shapes:test, resume)",
    "mmadapter train --base /models/llama-7b": "tests/test_train.py (the scienceqa: source)",
    "mmadapter convert llama_adapter": "tests/test_cli.py (convert and info round trip)",
    "make test": "the Makefile itself",
    "mmadapter chat --dtype int8": "tests/test_quant_cli.py (chat --dtype int8 / int4 and info through the CLI)",
    "mmadapter info LORA-BIAS-7B.pth": "tests/test_v2.py (info and `mmadapter convert` both ways through the CLI, "
                                       "the app, generation)",
}
SKIPPED_LINES = ("torchrun ",)  # tests/test_train_ddp.py runs training under torchrun


def readme_blocks() -> list[tuple[str, str]]:
    """(language, text) of every fenced block with a language."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w+)\n(.*?)^```", README.read_text(), re.M | re.S)]


def shell_lines(block: str) -> list[str]:
    """Commands of a bash block: continuations joined, comments dropped."""
    joined = block.replace("\\\n", " ")
    return [line.split(" #")[0].strip() for line in joined.splitlines() if line.strip() and not line.startswith("#")]


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("readme_stand_ins")
    base = make_text_base(root / "base")
    config = json.loads((base / "config.json").read_text())  # room for the README's default 256 new tokens
    (base / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 1024}))
    (root / "towers").mkdir()
    tower = make_tower_dir(root / "towers" / "tiny_vit")
    return {"base": str(base), "tower": f"local-dir:{tower}"}


def write_data(workdir: Path, stand_ins: dict[str, str]) -> None:
    rng = np.random.default_rng(0)
    records = [{"question": "What color is this?", "answer": colour, "image": f"images/{i}.png"}
               for i, colour in enumerate(["red", "green", "blue", "yellow"] * 2)]
    for folder in (workdir / "images", workdir / "data" / "images"):  # relative to --image-root / the data file
        folder.mkdir(parents=True, exist_ok=True)
        for i, r in enumerate(records):
            draw_picture(folder / f"{i}.png", r["answer"], rng)
    draw_picture(workdir / "photo.jpg", "red", rng)
    for name, data in (("data/train.jsonl", records), ("data/val.jsonl", records[:4])):
        (workdir / name).write_text("".join(json.dumps(r) + "\n" for r in data))
    (workdir / "alpaca.json").write_text(json.dumps(instruction_records(8, 1)))
    (workdir / "val.json").write_text(json.dumps(instruction_records(4, 2)))
    (workdir / "llava.json").write_text(json.dumps([{**r, "image": r["image"].removeprefix("images/")}
                                                    for r in records]))
    (workdir / "run.yaml").write_text(f"base: {stand_ins['base']}\ndata: alpaca.json\noutput_dir: runs/yaml\n"
                                      "epochs: 1\nn_layers: 2\nprogress: false\nplot: false\n")


def python_stand_in(code: str, stand_ins: dict[str, str]) -> str:
    code = code.replace('"smollm2-135m-instruct"', repr(stand_ins["base"]))
    code = code.replace('VisionConfig(model="ViT-L-14", pretrained="openai"',  # further options are kept
                        f'VisionConfig.from_spec({stand_ins["tower"]!r}, n_scales=2, projector_hidden=16')
    return code.replace("TrainConfig(epochs=5,", "TrainConfig(epochs=2, progress=False, plot=False,")


def cli_stand_in(argv: list[str], stand_ins: dict[str, str]) -> list[str]:
    argv = ["--vision" if a == "--vision" else stand_ins["tower"] if a == "ViT-L-14:openai" else a for a in argv]
    if argv[0] in ("train", "chat") and "--base" not in argv and "--config" not in argv:
        argv += ["--base", stand_ins["base"]]
    if argv[0] == "train" and "--config" not in argv:
        argv += ["--epochs", "1", "--n-layers", "2", "--no-progress", "--no-plot"]
    return argv


def test_every_block_is_run_or_covered_elsewhere():
    for lang, text in readme_blocks():
        if lang == "python" or any(shell_lines(text)[0].startswith(k) for k in ELSEWHERE):
            continue
        assert lang == "bash" and "mmadapter train --data alpaca.json" in text, f"README block not tested:\n{text}"


def test_readme_python_and_training_blocks_run_twice(stand_ins, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_data(tmp_path, stand_ins)
    monkeypatch.setattr(builtins, "input", lambda prompt="": "")  # `mmadapter chat`: an empty line quits
    python = [python_stand_in(text, stand_ins) for lang, text in readme_blocks() if lang == "python"]
    training = next(text for lang, text in readme_blocks() if "mmadapter train --data alpaca.json" in text)
    assert len(python) >= 2
    for attempt in (1, 2):
        session = {"__name__": "readme"}  # one session, top to bottom: later blocks use earlier imports
        for code in python:
            exec(compile(code, str(README), "exec"), session)
        for line in shell_lines(training):
            if line.startswith(SKIPPED_LINES):
                continue
            argv = cli_stand_in(shlex.split(line)[1:], stand_ins)
            assert main(argv) == 0, f"attempt {attempt}: {line}\n{capsys.readouterr().err[-2000:]}"
    assert (tmp_path / "runs" / "alpaca" / "adapter.safetensors").is_file()
    assert (tmp_path / "runs" / "mm" / "adapter.safetensors").is_file()
    assert json.loads((tmp_path / "runs" / "yaml" / "config.json").read_text())["lr"] == 0.01
