"""One tokenizer interface over the three vocabularies LLaMA-family checkpoints ship with.

- HF `tokenizer.json` (+ `tokenizer_config.json`, `special_tokens_map.json`, `generation_config.json`,
  `chat_template.jinja` beside it), run by the `tokenizers` library (tokenizer_hf.py).
- SentencePiece `tokenizer.model` (Meta LLaMA-1/2), run by `sentencepiece` (tokenizer_sentencepiece.py).
- A GGUF file's vocabulary (llama.cpp metadata), rebuilt as a `tokenizers` pipeline: byte-level BPE
  ("gpt2") or SentencePiece-style BPE with scores and byte fallback ("llama") (tokenizer_gguf.py).

`encode` never adds BOS/EOS on its own: callers say so (`bos=True`), and `add_bos` says what the model
expects. Special tokens written in the text (a rendered chat template) become their single ids.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .tokenizer_error import TokenizerError
from .tokenizer_gguf import open_gguf, read_gguf_vocabulary
from .tokenizer_hf import HFBackend, load_hf_tokenizer, read_hf_metadata
from .tokenizer_sentencepiece import SentencePieceBackend, load_sentencepiece

if TYPE_CHECKING:
    import gguf

__all__ = ["CONVENTIONAL_EOS_TOKENS", "END_OF_TURN_TOKENS", "Tokenizer", "TokenizerError"]

# End-of-turn markers of common chat formats; counted as EOS when the chat template uses them.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|end_of_turn|>")
# Conventional EOS spellings, tried only when no metadata names one.
CONVENTIONAL_EOS_TOKENS = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")

# Lone UTF-16 surrogates ("\ud800") can live in a Python str but cannot be encoded as UTF-8.
_SURROGATE = re.compile("[\ud800-\udfff]")


class Tokenizer:
    """Text <-> token ids for one model, plus its special ids and chat template."""

    def __init__(
        self,
        backend: HFBackend | SentencePieceBackend,
        *,
        bos_token: str | None,
        eos_token: str | None,
        pad_token: str | None = None,
        extra_eos_ids: Sequence[int] = (),
        add_bos: bool,
        chat_template: str | None,
        source: str,
    ) -> None:
        self._backend = backend
        self.source = source
        self.vocab_size: int = backend.vocab_size
        self.bos_id: int | None = self._known_id(bos_token)
        self.bos_token = bos_token if self.bos_id is not None else None
        eos_id = self._known_id(eos_token)
        if eos_id is None:  # nothing named one: fall back to a conventional spelling
            eos_token = next((t for t in CONVENTIONAL_EOS_TOKENS if backend.token_to_id(t) is not None), None)
            eos_id = self._known_id(eos_token)
        self.eos_token = eos_token if eos_id is not None else None
        end_of_turn = [backend.token_to_id(t) for t in END_OF_TURN_TOKENS if chat_template and t in chat_template]
        candidates = [eos_id, *extra_eos_ids, *end_of_turn]
        known = (i for i in candidates if i is not None and 0 <= i < self.vocab_size)
        self.eos_ids: tuple[int, ...] = tuple(dict.fromkeys(known))
        pad_id = self._known_id(pad_token)
        self.pad_id: int = pad_id if pad_id is not None else (self.eos_ids[0] if self.eos_ids else 0)
        self.add_bos: bool = bool(add_bos and self.bos_id is not None)
        self.chat_template: str | None = chat_template

    def _known_id(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)

    def __repr__(self) -> str:
        return (
            f"Tokenizer({self.source!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"eos_ids={self.eos_ids}, add_bos={self.add_bos})"
        )

    # -- text <-> ids -----------------------------------------------------------------------------

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text`; special tokens written in it map to their ids.

        With `bos=True` a BOS is prepended unless the text already starts with one (chat templates
        often render `bos_token` themselves), so a prompt never gets two.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        ids = self._backend.encode(_without_lone_surrogates(text))
        if bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        if eos and self.eos_ids:
            ids.append(self.eos_ids[0])
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(f"token ids {bad[:5]} are outside the vocabulary (size {self.vocab_size})")
        return self._backend.decode(ids, skip_special)

    def token_to_id(self, piece: str) -> int | None:
        return self._backend.token_to_id(piece)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(int(token_id))

    # -- chat -------------------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt string for `messages`, rendered like transformers' `apply_chat_template`."""
        if self.chat_template is None:
            raise TokenizerError(
                f"{self.source} has no chat template; format the prompt with a named prompt template "
                "instead (e.g. 'alpaca' from mmadapter.data) or load a tokenizer whose metadata has one"
            )
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise TokenizerError("messages must be a list of dicts with 'role' and 'content' keys")
        import jinja2

        try:
            return self._compiled_template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                tools=None,
                documents=None,
            )
        except jinja2.TemplateError as err:
            raise TokenizerError(f"chat template of {self.source} failed: {err}") from err

    @cached_property
    def _compiled_template(self) -> Any:
        return _compile_chat_template(self.chat_template or "", self.source)

    # -- loading ----------------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """An HF model dir (tokenizer.json preferred, else tokenizer.model) or a Meta LLaMA dir."""
        path = Path(path)
        if not path.is_dir():
            raise TokenizerError(f"{path} is not a directory; pass a model directory or use Tokenizer.from_file")
        for name in ("tokenizer.json", "tokenizer.model"):
            if (path / name).is_file():
                return cls.from_file(path / name)
        # Meta's downloads keep tokenizer.model beside the per-size model dirs (llama-2-7b/params.json).
        if (path / "params.json").is_file() and (path.parent / "tokenizer.model").is_file():
            return cls.from_file(path.parent / "tokenizer.model")
        raise TokenizerError(
            f"no tokenizer.json or tokenizer.model in {path}; copy the tokenizer files of the base model "
            "there, or load a .gguf with Tokenizer.from_file"
        )

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """`tokenizer.json`, a SentencePiece `*.model` or a `*.gguf`; HF config files beside it are read."""
        path = Path(path)
        if path.is_dir():
            return cls.from_dir(path)
        if not path.is_file():
            raise TokenizerError(f"tokenizer file {path} does not exist; check the path")
        if path.suffix == ".gguf":
            return cls.from_gguf(open_gguf(path))
        if path.suffix == ".json":
            backend: HFBackend | SentencePieceBackend = HFBackend(load_hf_tokenizer(path))
        elif path.suffix == ".model":
            backend = SentencePieceBackend(load_sentencepiece(path))
        else:
            raise TokenizerError(f"{path}: unknown format; pass tokenizer.json, a SentencePiece .model or a .gguf")
        meta = read_hf_metadata(path.parent)
        bos = meta.get("bos_token", backend.default_bos)
        add_bos = meta.get("add_bos_token")
        if add_bos is None:
            add_bos = backend.adds_bos_by_default(backend.token_to_id(bos) if bos else None)
        return cls(
            backend,
            bos_token=bos,
            eos_token=meta.get("eos_token", backend.default_eos),
            pad_token=meta.get("pad_token", backend.default_pad),
            extra_eos_ids=meta.get("eos_token_ids", ()),
            add_bos=add_bos,
            chat_template=meta.get("chat_template"),
            source=str(path),
        )

    @classmethod
    def from_gguf(cls, reader: gguf.GGUFReader) -> Tokenizer:
        """The vocabulary stored in a GGUF file's metadata (llama.cpp's `tokenizer.*` keys)."""
        return cls(**read_gguf_vocabulary(reader))


# -- helpers -------------------------------------------------------------------------------------


def _without_lone_surrogates(text: str) -> str:
    """`text` with surrogate pairs joined and lone surrogates replaced by U+FFFD (what UTF-8 decoders do)."""
    if not _SURROGATE.search(text):
        return text
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def _compile_chat_template(template: str, source: str) -> Any:
    """A Jinja2 template in a sandbox, with the globals and whitespace rules HF templates expect."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
        return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as err:
        raise TokenizerError(f"chat template of {source} is not valid Jinja2 ({err})") from err
