"""Hostile prompts through the tokenizers, the model (generate / stream) and the app's ChatService.

Decisions, tested here:
- Lone UTF-16 surrogates ("\\ud800", as JSON "\\ud800" escapes produce) cannot be encoded as UTF-8;
  `tokenizers` and `sentencepiece` raise TypeError / RuntimeError on them. `Tokenizer.encode` joins
  surrogate pairs and replaces lone ones with U+FFFD, which is what a UTF-8 decoder does with the
  bytes they stand for.
- `MMAdapter.generate/stream` raise a clear ValueError when prompt + max_new_tokens exceed the
  context, instead of truncating: which end to cut, and whether cutting is acceptable at all (an
  evaluation must not silently answer half a question), is the caller's decision, and the library
  offers it as `fit_prompt`, which the app uses (oldest turns first, then the question's end, with a
  note to the user).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "hostile"))

import make_corpus  # noqa: E402

from mmadapter.adapter_set import AdapterSet  # noqa: E402
from mmadapter.tokenizer import Tokenizer  # noqa: E402

PROMPTS = {
    "empty": "",
    "whitespace": " \n\t\r  \u3000",
    "control characters": "a\x00b\x01\x07\x1b[31mred\x1b[0m\x7f\x85c\x08",
    "lone surrogate": "why\ud800?",
    "reversed surrogates": "\udc00\ud800",
    "right-to-left": "\u202eمرحبا بالعالم\u202c שלום",
    "emoji": "👩\u200d👩\u200d👧\u200d👦 🏳️\u200d🌈 🇫🇷",
    "zero width": "a\u200d\u200b\ufeffb\u2060c",
    "combining marks": "e" + "\u0301" * 60,
}
LONG = "Please summarise this. " + "blah " * 20_000  # 100k characters
MAX_NEW_TOKENS = 1  # the prompt is what is tested; one token proves decoding ran
SURROGATE_CASES = [("a\ud800b", "a\ufffdb"), ("\udc00\ud800", "\ufffd\ufffd"), ("\ud83d\ude00", "😀"),
                   ("x\ud83d", "x\ufffd")]


@pytest.fixture(scope="module")
def tokenizers(smollm, tmp_path_factory):
    """One tokenizer per backend: GGUF byte-level BPE (SmolLM2), tokenizer.json, SentencePiece."""
    folder = tmp_path_factory.mktemp("tokenizers")
    (folder / "tokenizer.json").write_text(make_corpus.tokenizer_json())
    (folder / "sp.model").write_bytes(make_corpus.sentencepiece_model())
    return {"gguf": smollm.tokenizer, "json": Tokenizer.from_file(folder / "tokenizer.json"),
            "sentencepiece": Tokenizer.from_file(folder / "sp.model")}


@pytest.mark.parametrize("backend", ["gguf", "json", "sentencepiece"])
def test_lone_surrogates_encode_as_the_replacement_character(tokenizers, backend):
    tok = tokenizers[backend]
    for text, same_as in SURROGATE_CASES:
        assert tok.encode(text) == tok.encode(same_as), (backend, ascii(text))


def test_hostile_text_round_trips_through_the_byte_level_tokenizer(tokenizers):
    tok = tokenizers["gguf"]
    for name, text in PROMPTS.items():
        expected = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
        assert tok.decode(tok.encode(text)) == expected, name
    start = time.perf_counter()
    assert tok.decode(tok.encode(LONG)) == LONG
    assert time.perf_counter() - start < 5


def test_generate_survives_hostile_prompts(smollm):
    texts = smollm.generate(list(PROMPTS.values()), max_new_tokens=MAX_NEW_TOKENS)  # one batch, left-padded
    assert len(texts) == len(PROMPTS) and all(isinstance(t, str) for t in texts)


def test_generate_equals_stream_on_a_lone_surrogate(smollm):
    prompt = PROMPTS["lone surrogate"]
    text = smollm.generate(prompt, max_new_tokens=MAX_NEW_TOKENS)
    assert text == "".join(smollm.stream(prompt, max_new_tokens=MAX_NEW_TOKENS))


def test_an_empty_raw_prompt_is_a_clear_error(smollm):
    assert not smollm.tokenizer.add_bos  # so a raw "" has no token at all
    with pytest.raises(ValueError, match="at least one token"):
        smollm.generate("", template="raw", max_new_tokens=MAX_NEW_TOKENS)


def test_an_overlong_prompt_is_a_clear_error_and_fit_prompt_truncates_it(smollm):
    context = smollm.base.config.max_seq_len
    start = time.perf_counter()
    with pytest.raises(ValueError, match=rf"exceed the model's context of {context}; truncate the prompt"):
        smollm.generate(LONG, max_new_tokens=MAX_NEW_TOKENS)
    with pytest.raises(ValueError, match="exceed the model's context"):
        next(smollm.stream(LONG, max_new_tokens=MAX_NEW_TOKENS))
    assert time.perf_counter() - start < 5  # refused before any forward pass
    prompt, history, note = smollm.fit_prompt(LONG, [("earlier question", "earlier answer")], max_prompt_tokens=256)
    assert LONG.startswith(prompt) and len(prompt) < len(LONG) and history == []
    assert "dropped the 1 oldest turn" in note and f"of {len(LONG):,} characters" in note
    assert len(smollm.prompt_ids(prompt)) <= 256
    assert isinstance(smollm.generate(prompt, max_new_tokens=MAX_NEW_TOKENS), str)


def test_chat_service_answers_every_hostile_prompt(smollm):
    from mmadapter.app.service import ChatService

    service = ChatService(smollm, AdapterSet(smollm), max_prompt_tokens=256)
    hostile_history = [(PROMPTS["emoji"], PROMPTS["right-to-left"]), (PROMPTS["lone surrogate"], "\x00")]
    for name, prompt in {**PROMPTS, "100k characters": LONG}.items():
        replies = list(service.answer(prompt, None, hostile_history, max_new_tokens=MAX_NEW_TOKENS))
        final = replies[-1]
        if not prompt.strip():
            assert final.note and "type a question" in final.note, name
        else:
            assert final.text.strip(), name  # an answer (or "(no answer)"), never an exception
        if name == "100k characters":
            assert "truncated" in final.note
    assert service.failures == 0
