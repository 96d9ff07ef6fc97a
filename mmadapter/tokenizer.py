"""One tokenizer interface over the three vocabularies LLaMA-family checkpoints ship with.

- HF `tokenizer.json` (+ `tokenizer_config.json`, `special_tokens_map.json`, `generation_config.json`,
  `chat_template.jinja` beside it), run by the `tokenizers` library.
- SentencePiece `tokenizer.model` (Meta LLaMA-1/2), run by `sentencepiece`.
- A GGUF file's vocabulary (llama.cpp metadata), rebuilt as a `tokenizers` pipeline: byte-level BPE
  ("gpt2") or SentencePiece-style BPE with scores and byte fallback ("llama").

`encode` never adds BOS/EOS on its own: callers say so (`bos=True`), and `add_bos` says what the model
expects. Special tokens written in the text (a rendered chat template) become their single ids.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .safe_io import read_json_object

if TYPE_CHECKING:
    import gguf
    import sentencepiece
    import tokenizers

# End-of-turn markers of common chat formats; counted as EOS when the chat template uses them.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|end_of_turn|>")
# Conventional EOS spellings, tried only when no metadata names one.
CONVENTIONAL_EOS_TOKENS = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")

# GGUF token types (llama.cpp `llama_token_type`).
GGUF_NORMAL, GGUF_CONTROL, GGUF_USER_DEFINED = 1, 3, 4

# Pre-tokenizer split regexes by `tokenizer.ggml.pre` (the models' own tokenizer.json / llama.cpp).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GGUF_LLAMA3_PRE = ("llama-bpe", "llama3", "llama-v3")
GGUF_SPLIT_REGEXES = {**dict.fromkeys(GGUF_LLAMA3_PRE, _LLAMA3_SPLIT), "qwen2": _QWEN2_SPLIT}
# llama.cpp isolates every \p{N} character first for these, then splits like GPT-2.
GGUF_DIGIT_PRE = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone")
GGUF_GPT2_PRE = ("default", "gpt2", "gpt-2")

# Lone UTF-16 surrogates ("\ud800") can live in a Python str but cannot be encoded as UTF-8.
_SURROGATE = re.compile("[\ud800-\udfff]")


class TokenizerError(ValueError):
    """A tokenizer file is missing, corrupt or unsupported, or a chat template cannot be rendered."""


class Tokenizer:
    """Text <-> token ids for one model, plus its special ids and chat template."""

    def __init__(
        self,
        backend: _HFBackend | _SentencePieceBackend,
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
            return cls.from_gguf(_open_gguf(path))
        if path.suffix == ".json":
            backend: _HFBackend | _SentencePieceBackend = _HFBackend(_load_hf_tokenizer(path))
        elif path.suffix == ".model":
            backend = _SentencePieceBackend(_load_sentencepiece(path))
        else:
            raise TokenizerError(f"{path}: unknown format; pass tokenizer.json, a SentencePiece .model or a .gguf")
        meta = _read_hf_metadata(path.parent)
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
        source = str(getattr(reader.data, "filename", None) or "GGUF file")
        try:
            meta = {name: _gguf_value(field) for name, field in reader.fields.items() if name.startswith("tokenizer.")}
        except (ValueError, IndexError) as err:  # e.g. a string that is not UTF-8
            raise TokenizerError(f"{source}: unreadable tokenizer metadata ({type(err).__name__}: {err})") from err
        _check_gguf_tokenizer_types(meta, source)
        kind = meta.get("tokenizer.ggml.model")
        tokens = meta.get("tokenizer.ggml.tokens")
        if kind is None or tokens is None:
            raise TokenizerError(f"{source} has no tokenizer metadata (tokenizer.ggml.model / .tokens)")
        types = meta.get("tokenizer.ggml.token_type") or [GGUF_NORMAL] * len(tokens)
        pre = meta.get("tokenizer.ggml.pre")
        if kind not in ("gpt2", "llama"):
            raise TokenizerError(
                f"{source}: GGUF tokenizer type {kind!r} is not supported (supported: 'gpt2', 'llama'); "
                "use the model's tokenizer.json with Tokenizer.from_file instead"
            )
        if kind == "llama" and meta.get("tokenizer.ggml.scores") is None:
            raise TokenizerError(f"{source}: a 'llama' (SentencePiece) vocabulary needs tokenizer.ggml.scores")
        try:
            if kind == "gpt2":
                merges = meta.get("tokenizer.ggml.merges")
                backend = _HFBackend(_build_gguf_byte_level(tokens, merges, types, pre, source))
            else:
                prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
                unk_id = meta.get("tokenizer.ggml.unknown_token_id")
                scores = meta["tokenizer.ggml.scores"]
                backend = _HFBackend(_build_gguf_sentencepiece(tokens, scores, types, prefix, unk_id))
        except TokenizerError:
            raise
        except Exception as err:  # tokenizers raises a bare Exception, e.g. for a merge of unknown tokens
            raise TokenizerError(f"{source}: the GGUF vocabulary is inconsistent ({err})") from err

        def token(key: str) -> str | None:
            index = meta.get(f"tokenizer.ggml.{key}")
            return tokens[index] if index is not None and 0 <= index < len(tokens) else None

        add_bos = meta.get("tokenizer.ggml.add_bos_token")
        if add_bos is None:  # llama.cpp's defaults: SentencePiece and Llama 3 vocabularies start with BOS
            add_bos = kind == "llama" or pre in GGUF_LLAMA3_PRE
        eot = meta.get("tokenizer.ggml.eot_token_id")
        return cls(
            backend,
            bos_token=token("bos_token_id"),
            eos_token=token("eos_token_id"),
            pad_token=token("padding_token_id"),
            extra_eos_ids=() if eot is None else (eot,),
            add_bos=add_bos,
            chat_template=meta.get("tokenizer.chat_template"),
            source=source,
        )


# -- backends -------------------------------------------------------------------------------------


class _HFBackend:
    """A `tokenizers.Tokenizer`: tokenizer.json files and the pipelines rebuilt from GGUF vocabularies."""

    default_bos = default_eos = default_pad = None

    def __init__(self, tokenizer: tokenizers.Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special: bool) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special)

    def token_to_id(self, piece: str) -> int | None:
        return self.tokenizer.token_to_id(piece)

    def id_to_token(self, token_id: int) -> str | None:
        return self.tokenizer.id_to_token(token_id)

    def adds_bos_by_default(self, bos_id: int | None) -> bool:
        """Whether tokenizer.json's post-processor puts BOS first (e.g. Llama 3), when no config says."""
        ids = self.tokenizer.encode("", add_special_tokens=True).ids
        return bos_id is not None and ids[:1] == [bos_id]


class _SentencePieceBackend:
    """A SentencePiece model; control pieces written in the text ("<s>") are split out first."""

    def __init__(self, processor: sentencepiece.SentencePieceProcessor) -> None:
        self.sp = processor
        self.vocab_size = processor.get_piece_size()
        self._pieces = {processor.id_to_piece(i): i for i in range(self.vocab_size)}
        self._control = {piece: i for piece, i in self._pieces.items() if processor.is_control(i)}
        longest_first = sorted(self._control, key=len, reverse=True)
        pattern = "(" + "|".join(map(re.escape, longest_first)) + ")"
        self._control_split = re.compile(pattern) if longest_first else None
        special_ids = (processor.bos_id(), processor.eos_id(), processor.pad_id())  # -1 when absent
        self.default_bos, self.default_eos, self.default_pad = (
            processor.id_to_piece(i) if i >= 0 else None for i in special_ids
        )

    def encode(self, text: str) -> list[int]:
        # Each stretch between control pieces is encoded on its own (with SentencePiece's leading
        # space), as Meta's chat code and llama.cpp do.
        chunks = self._control_split.split(text) if self._control_split else [text]
        ids: list[int] = []
        for chunk in chunks:
            if chunk in self._control:
                ids.append(self._control[chunk])
            elif chunk:
                ids.extend(self.sp.encode(chunk))
        return ids

    def decode(self, ids: list[int], skip_special: bool) -> str:
        if skip_special:
            return self.sp.decode(ids)  # SentencePiece renders control pieces as nothing
        parts: list[str] = []
        run: list[int] = []
        for i in [*ids, None]:
            if i is None or self.sp.is_control(i):
                if run:
                    parts.append(self.sp.decode(run))
                    run = []
                if i is not None:
                    parts.append(self.sp.id_to_piece(i))
            else:
                run.append(i)
        return "".join(parts)

    def token_to_id(self, piece: str) -> int | None:
        return self._pieces.get(piece)

    def id_to_token(self, token_id: int) -> str | None:
        return self.sp.id_to_piece(token_id) if 0 <= token_id < self.vocab_size else None

    def adds_bos_by_default(self, bos_id: int | None) -> bool:
        return bos_id is not None  # LLaMA-1/2 prompts start with BOS


# -- loading helpers ------------------------------------------------------------------------------


def _load_hf_tokenizer(path: Path) -> tokenizers.Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    try:
        return HFTokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception on bad JSON
        raise TokenizerError(
            f"{path} is not a valid tokenizer.json ({err}); re-download the tokenizer files of the model"
        ) from err


def _load_sentencepiece(path: Path) -> sentencepiece.SentencePieceProcessor:
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.Load(str(path))
    except (OSError, RuntimeError) as err:
        raise TokenizerError(
            f"{path} is not a valid SentencePiece model ({err}); re-download tokenizer.model of the model"
        ) from err
    return processor


def _without_lone_surrogates(text: str) -> str:
    """`text` with surrogate pairs joined and lone surrogates replaced by U+FFFD (what UTF-8 decoders do)."""
    if not _SURROGATE.search(text):
        return text
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return read_json_object(path)
    except ValueError as err:
        raise TokenizerError(f"{path} is corrupt ({err}); fix or delete it, or re-download the model") from err


def _token_content(value: Any) -> str | None:
    """Token strings in HF configs are either "</s>" or {"content": "</s>", ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_hf_metadata(folder: Path) -> dict[str, Any]:
    """Special tokens, BOS flag, chat template and EOS ids from the HF config files in `folder`."""
    meta: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
        if not (folder / name).is_file():
            continue
        config = _read_json(folder / name)
        for key in ("bos_token", "eos_token", "pad_token"):
            if key in config:
                meta[key] = _token_content(config[key])
        if isinstance(config.get("add_bos_token"), bool):
            meta["add_bos_token"] = config["add_bos_token"]
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            named = (t for t in template if isinstance(t, dict) and t.get("name") == "default")
            template = next((t.get("template") for t in named), None)
        if isinstance(template, str):
            meta["chat_template"] = template
    if (folder / "chat_template.jinja").is_file():
        try:
            meta["chat_template"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise TokenizerError(f"{folder / 'chat_template.jinja'} is unreadable ({err}); fix or delete it") from err
    if (folder / "generation_config.json").is_file():
        eos = _read_json(folder / "generation_config.json").get("eos_token_id")
        ids = eos if isinstance(eos, list) else [eos]
        meta["eos_token_ids"] = tuple(i for i in ids if isinstance(i, int))
    return meta


def _open_gguf(path: Path) -> gguf.GGUFReader:
    import gguf

    from .safe_io import check_gguf_header

    try:
        check_gguf_header(path)  # counts and lengths checked against the file before GGUFReader trusts them
        return gguf.GGUFReader(path)
    except Exception as err:  # the reader raises ValueError, KeyError, struct errors, ...
        raise TokenizerError(f"{path} is not a readable GGUF file ({err}); re-download or re-convert it") from err


def _gguf_value(field: Any) -> Any:
    """A metadata field as Python values (gguf's `contents()`, decoded by hand on older gguf)."""
    if hasattr(field, "contents"):
        return field.contents()
    from gguf import GGUFValueType

    is_string = field.types[-1] == GGUFValueType.STRING
    parts = [field.parts[i] for i in field.data]
    values = [bytes(part).decode("utf-8") if is_string else part.tolist()[0] for part in parts]
    return values if field.types[0] == GGUFValueType.ARRAY else values[0]


# The types of the tokenizer.* metadata we read: (Python types accepted, is a list of them).
_GGUF_TOKENIZER_TYPES: dict[str, tuple[tuple[type, ...], bool]] = {
    "tokenizer.ggml.model": ((str,), False),
    "tokenizer.ggml.pre": ((str,), False),
    "tokenizer.ggml.tokens": ((str,), True),
    "tokenizer.ggml.merges": ((str,), True),
    "tokenizer.ggml.scores": ((int, float), True),
    "tokenizer.ggml.token_type": ((int,), True),
    "tokenizer.ggml.add_bos_token": ((bool,), False),
    "tokenizer.ggml.add_space_prefix": ((bool,), False),
    "tokenizer.chat_template": ((str,), False),
    **{f"tokenizer.ggml.{name}": ((int,), False) for name in (
        "bos_token_id", "eos_token_id", "eot_token_id", "padding_token_id", "unknown_token_id")},
}


def _check_gguf_tokenizer_types(meta: dict[str, Any], source: str) -> None:
    """Refuse tokenizer metadata of the wrong type (a number where the tokens belong, ...) by name."""
    for key, (types, is_list) in _GGUF_TOKENIZER_TYPES.items():
        value = meta.get(key)
        if value is None:
            continue
        items = value if is_list and isinstance(value, list) else [value]
        wanted = " or ".join(t.__name__ for t in types)
        if (is_list and not isinstance(value, list)) or not all(
            isinstance(v, types) and (bool in types or not isinstance(v, bool)) for v in items
        ):
            raise TokenizerError(f"{source}: {key} should be {'a list of ' if is_list else 'of type '}{wanted}")
    tokens = meta.get("tokenizer.ggml.tokens") or []
    for key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        if meta.get(key) is not None and len(meta[key]) != len(tokens):
            raise TokenizerError(f"{source}: {key} has {len(meta[key])} entries for {len(tokens)} tokens")


def _added_tokens(tokens: Sequence[str], types: Sequence[int]) -> list[Any]:
    """Control tokens (special: dropped by decode) and user-defined ones, both matched whole in text."""
    from tokenizers import AddedToken

    return [
        AddedToken(token, special=kind == GGUF_CONTROL, normalized=False)
        for token, kind in zip(tokens, types)
        if kind in (GGUF_CONTROL, GGUF_USER_DEFINED) and token
    ]


def _build_gguf_byte_level(
    tokens: Sequence[str], merges: Sequence[str] | None, types: Sequence[int], pre: str | None, source: str
) -> tokenizers.Tokenizer:
    """GPT-2 style byte-level BPE, with the pre-tokenizer the vocabulary was trained with."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    if merges is None:
        raise TokenizerError(f"{source}: a 'gpt2' vocabulary needs tokenizer.ggml.merges")
    vocab = {token: i for i, token in enumerate(tokens)}
    pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in GGUF_SPLIT_REGEXES:
        split = pre_tokenizers.Split(Regex(GGUF_SPLIT_REGEXES[pre]), behavior="isolated")
        bytes_only = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        pre_tokenizer = pre_tokenizers.Sequence([split, bytes_only])
    elif pre in GGUF_DIGIT_PRE:
        pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        if pre not in (None, *GGUF_GPT2_PRE):
            warnings.warn(f"{source}: pre-tokenizer {pre!r} is unknown here; splitting like GPT-2", stacklevel=3)
        pre_tokenizer = byte_level
    # Llama 3 takes a pre-token that is itself in the vocabulary whole (tokenizer.json: ignore_merges).
    model = models.BPE(vocab, pairs, ignore_merges=pre in GGUF_LLAMA3_PRE)
    tokenizer = HFTokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(_added_tokens(tokens, types))
    return tokenizer


def _build_gguf_sentencepiece(
    tokens: Sequence[str],
    scores: Sequence[float],
    types: Sequence[int],
    add_space_prefix: bool,
    unk_id: int | None,
) -> tokenizers.Tokenizer:
    """SentencePiece BPE (LLaMA-1/2 GGUFs) as a `tokenizers` BPE.

    SentencePiece merges the adjacent pair whose joined piece scores highest; listing every split of
    each normal piece, best score first, gives `tokenizers` the same merge order.
    """
    from tokenizers import decoders, models, normalizers
    from tokenizers import Tokenizer as HFTokenizer

    vocab = {token: i for i, token in enumerate(tokens)}
    ranked = []
    for token, score, kind in zip(tokens, scores, types):
        if kind != GGUF_NORMAL or len(token) < 2:
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((-score, vocab[token], left, right))
    ranked.sort()
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    merges = [(left, right) for _, _, left, right in ranked]
    model = models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
    tokenizer = HFTokenizer(model)
    # Added tokens are cut out first, so every stretch of text between them gets its own "▁" prefix,
    # as in llama.cpp and Meta's per-turn encoding.
    steps = [normalizers.Prepend("▁")] if add_space_prefix else []
    tokenizer.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    strip = [decoders.Strip(" ", 1, 0)] if add_space_prefix else []
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence([*steps, *strip])
    tokenizer.add_special_tokens(_added_tokens(tokens, types))
    return tokenizer


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
