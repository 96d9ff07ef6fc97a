"""CLI smoke tests: --help everywhere, convert/info/chat on tiny files, and clear exit-2 errors."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from interop_helpers import add_byte_tokenizer, v1_state
from interop_helpers import one_thread  # noqa: F401  (autouse fixture: importing it applies it here)

from mmadapter import load_base
from mmadapter.adapter_file import load_adapter, read_adapter
from mmadapter.cli import build_parser, main


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny HF Llama (GQA) with a byte-level tokenizer."""
    from conftest import save_tiny_hf

    path = tmp_path_factory.mktemp("cli_base")
    save_tiny_hf(path, seed=7)
    add_byte_tokenizer(path)
    return path


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def info_json(path, capsys, *flags):
    code, out, err = run(["info", path, "--json", *flags], capsys)
    assert code == 0, err
    return json.loads(out)


def test_help_for_every_command(capsys):
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    names = list(sub.choices)
    assert {"chat", "convert", "info"} <= set(names)  # train/eval/serve are tested here once they exist
    for name in names:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        assert f"usage: mmadapter {name}" in capsys.readouterr().out


def test_convert_and_info_round_trip(base, tmp_path, capsys):
    model = load_base(str(base))
    state = v1_state(model.base.config, 4, 3, scalar=True)  # one gate per layer: exportable to PEFT
    torch.save(state, tmp_path / "v1.pth")

    info = info_json(tmp_path / "v1.pth", capsys)
    assert info["format"] == "LLaMA-Adapter V1"
    assert (info["adapter"]["n_prompts"], info["adapter"]["n_layers"]) == (4, 3)

    code, out, err = run(["convert", tmp_path / "v1.pth", tmp_path / "ours.safetensors", "--to", "mmadapter",
                          "--base", base], capsys)
    assert code == 0, err
    assert out.startswith(f"wrote {tmp_path / 'ours.safetensors'}") and "K=4 prompts x L=3 layers" in out
    info = info_json(tmp_path / "ours.safetensors", capsys)
    assert info["base"]["fingerprint"] == model.base_fingerprint
    assert (info["adapter"]["n_prompts"], info["adapter"]["layers"], info["template"]) == (4, "1-3", "alpaca")
    assert info["parameters"] == {"prompts": 3 * 4 * 64, "gates": 3, "total": 3 * 4 * 64 + 3}  # one per layer
    assert info["training"]["imported_from"] == "v1"

    code, _, err = run(["convert", tmp_path / "ours.safetensors", tmp_path / "peft", "--to", "peft"], capsys)
    assert code == 0, err
    info = info_json(tmp_path / "peft", capsys)
    assert info["format"] == "PEFT AdaptionPrompt" and info["config"]["adapter_len"] == 4
    gates = [float(torch.tanh(state[f"layers.{i}.attention.gate"].float())) for i in (1, 2, 3)]
    assert info["adapter"]["gate_values"] == pytest.approx(gates, abs=1e-6)  # PEFT multiplies by tanh(g) as is

    code, _, err = run(["convert", tmp_path / "peft", tmp_path / "back.safetensors", "--to", "mmadapter",
                        "--base", base], capsys)
    assert code == 0, err
    (_, first), (_, back) = read_adapter(tmp_path / "ours.safetensors"), read_adapter(tmp_path / "back.safetensors")
    assert torch.equal(first["prompts"], back["prompts"])
    torch.testing.assert_close(back["gates"], first["gates"], atol=0, rtol=2e-6)

    # the converted adapter chats through --adapter exactly like the Python API
    code, out, err = run(["chat", "--base", base, "--adapter", tmp_path / "ours.safetensors", "--once", "Hi",
                          "--max-new-tokens", "5"], capsys)
    assert code == 0, err
    load_adapter(model, tmp_path / "ours.safetensors")
    assert out == model.generate("Hi", max_new_tokens=5) + "\n"


def test_chat_once_on_the_tiny_base(base, capsys):
    code, out, err = run(["chat", "--base", base, "--once", "Name a colour.", "--max-new-tokens", "4"], capsys)
    assert code == 0, err
    assert out == load_base(str(base)).generate("Name a colour.", max_new_tokens=4) + "\n"


def test_info_on_bases(base, tmp_path, capsys):
    import gguf
    import numpy as np

    info = info_json(base, capsys, "--fingerprint")
    assert info["format"] == "Hugging Face" and info["config"]["n_kv_heads"] == 2
    assert info["fingerprint"] == load_base(str(base)).base_fingerprint
    assert info["weights"]["parameters"] == sum(p.numel() for p in load_base(str(base)).base.parameters())
    assert info["tokenizer"] == "tokenizer.json"

    writer = gguf.GGUFWriter(tmp_path / "tiny.gguf", arch="llama")
    writer.add_name("tiny")
    writer.add_block_count(2)
    writer.add_embedding_length(8)
    writer.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    info = info_json(tmp_path / "tiny.gguf", capsys)
    assert info["metadata"]["llama.block_count"] == 2 and info["metadata"]["general.name"] == "tiny"
    assert info["weights"]["parameters"] == 16 * 8 + 8 and info["weights"]["types"] == {"F32": 2}

    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "params.json").write_text(json.dumps({"dim": 8, "n_layers": 1, "n_heads": 2}))
    torch.save({"tok_embeddings.weight": torch.zeros(16, 8), "norm.weight": torch.ones(8)},
               meta / "consolidated.00.pth")
    info = info_json(meta, capsys)
    assert info["params"]["dim"] == 8 and info["weights"]["parameters"] == 136

    code, out, _ = run(["info", base], capsys)  # the text form
    assert code == 0 and "format: Hugging Face" in out and "n_layers: 4" in out


def test_errors_exit_2_with_one_line_on_stderr(base, tmp_path, capsys):
    config = load_base(str(base)).base.config
    torch.save(v1_state(config, 2, 2), tmp_path / "per_head.pth")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "exists.safetensors").write_bytes(b"")
    from conftest import save_tiny_hf

    save_tiny_hf(tmp_path / "wide", hidden_size=128)
    capsys.readouterr()  # transformers' progress bar
    cases = [
        (["info", tmp_path / "missing.safetensors"], "no such file or directory"),
        (["convert", tmp_path / "notes.txt", tmp_path / "x", "--to", "peft"], "unknown adapter format"),
        (["convert", tmp_path / "per_head.pth", tmp_path / "p", "--to", "peft", "--base", base],
         "different gates per head"),
        (["convert", tmp_path / "per_head.pth", tmp_path / "exists.safetensors", "--to", "mmadapter",
          "--base", base], "pass --force"),
        (["convert", tmp_path / "per_head.pth", tmp_path / "w.safetensors", "--to", "mmadapter",
          "--base", tmp_path / "wide"], "the base has dim 128"),
        (["convert", tmp_path / "per_head.pth", tmp_path / "k.safetensors", "--to", "mmadapter", "--base", base,
          "--n-prompts", "3"], "K=3 does not divide"),
        (["chat", "--base", base, "--adapter", tmp_path / "missing.safetensors", "--once", "hi"],
         "no such adapter file"),
    ]
    for argv, message in cases:
        code, out, err = run(argv, capsys)
        assert code == 2, (argv, out, err)
        assert err.startswith(f"mmadapter {argv[0]}: error: ") and message in err, err
        assert err.count("\n") == 1, err
    assert not (tmp_path / "p").exists()  # a refused export writes nothing

    with pytest.raises(SystemExit) as e:  # argparse: a missing required flag
        main(["convert", str(tmp_path / "per_head.pth"), str(tmp_path / "y")])
    assert e.value.code == 2 and "--to" in capsys.readouterr().err


def test_module_entry_point(tmp_path, monkeypatch, capsys):
    """`python -m mmadapter` runs the same main() and exits with its code."""
    import runpy

    monkeypatch.setattr(sys, "argv", ["mmadapter", "info", str(tmp_path / "nope.pth")])
    with pytest.raises(SystemExit) as e:
        runpy.run_module("mmadapter", run_name="__main__")
    assert e.value.code == 2
    assert capsys.readouterr().err == f"mmadapter info: error: {tmp_path / 'nope.pth'}: no such file or directory\n"


def test_vision_is_one_spelling_with_one_default_in_every_command(base, capsys):
    from mmadapter.commands.train import resolve_options
    from mmadapter.config import VisionConfig

    def parsed(command, spec):
        args = build_parser().parse_args([*command, "--vision", spec])
        if command[0] == "train":
            return VisionConfig.from_spec(resolve_options(args)[0].vision)
        return args.vision

    commands = [["chat"], ["eval", "scienceqa", "--data", "x"], ["serve"], ["train"]]
    for command in commands:
        assert parsed(command, "ViT-B-32") == VisionConfig(model="ViT-B-32", pretrained="openai")
        assert parsed(command, "ViT-B-32:none") == VisionConfig(model="ViT-B-32", pretrained=None)
        assert parsed(command, "ViT-B-32:/w/b32.safetensors").pretrained == "/w/b32.safetensors"
        assert parsed(command, "local-dir:/towers/t") == VisionConfig(model="local-dir:/towers/t", pretrained=None)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["chat", "--vision", "ViT-B-32:"])
    assert "nothing after ':'" in capsys.readouterr().err
    code, _, err = run(["chat", "--base", base, "--vision", "ViT-B-32", "--once", "hi"], capsys)
    assert code == 2 and "--vision names the image tower of a multimodal adapter" in err


def test_output_files_follow_the_umask(tmp_path):
    import os

    from mmadapter.atomic import atomic_write_text

    before = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        os.umask(0o077)
        atomic_write_text(tmp_path / "b.json", "{}")
    finally:
        os.umask(before)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.json").stat().st_mode & 0o777 == 0o600


def test_info_names_the_embedded_model_and_a_closed_pipe_is_quiet():
    import subprocess

    from test_train import subprocess_env

    proc = subprocess.Popen([sys.executable, "-m", "mmadapter", "info", "smollm2-135m-instruct"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=subprocess_env())
    proc.stdout.close()  # like `| head` that already quit: every write hits a closed pipe
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0, err
    assert err == ""
    proc = subprocess.run([sys.executable, "-m", "mmadapter", "info", "smollm2-135m-instruct", "--json"],
                          capture_output=True, text=True, env=subprocess_env(), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["format"] == "GGUF"


def test_train_flags_usage_and_early_checks(tmp_path, capsys):
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--help"])
    help_text = capsys.readouterr().out
    assert "--dtype {float32,bfloat16,float16," in help_text and ",None}" not in help_text
    assert parser.parse_args(["train", "--dtype", "none"]).dtype is None
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--dtype", "float64"])
    assert "invalid choice 'float64' (choose from float32, bfloat16, float16, " in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--foo"])
    err = capsys.readouterr().err
    assert err.startswith("usage: mmadapter train") and "unrecognized arguments: --foo" in err
    data = tmp_path / "data.json"
    data.write_text("[]")
    nowhere = tmp_path / "no-base"  # checked after the inputs: an error about it means they passed
    for flags, message in ((["--data", tmp_path / "missing.json"], "missing.json: no such data file"),
                           (["--data", data, "--eval-data", tmp_path / "v.json"], "--eval-data"),
                           (["--data", data, "--template", "bogus"], "unknown template 'bogus'"),
                           (["--data", data, "--vision", "ViT-B-32:"], "nothing after ':'")):
        code, _, err = run(["train", "--base", nowhere, "--output-dir", tmp_path / "run", *flags], capsys)
        assert code == 2 and message in err and "no-base" not in err, err
    assert not (tmp_path / "run").exists()


def test_ctrl_c_in_chat_stops_the_answer_and_keeps_the_session(monkeypatch, capsys):
    import builtins

    from mmadapter.commands import chat

    class Model:
        def __init__(self):
            self.histories = []

        def stream(self, question, image, history, **kw):
            self.histories.append(list(history))
            yield "Once"
            raise KeyboardInterrupt

    model = Model()
    monkeypatch.setattr(chat, "load_model", lambda args: model)
    questions = iter(["Tell a story.", "Another?", ""])
    monkeypatch.setattr(builtins, "input", lambda prompt: next(questions))
    assert main(["chat"]) == 0
    out, err = capsys.readouterr()
    assert out == "Once\nOnce\n" and "[stopped]" in err and "interrupted" not in err
    assert model.histories == [[], [("Tell a story.", "Once")]]
