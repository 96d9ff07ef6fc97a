"""A GGUF file's vocabulary (llama.cpp metadata), rebuilt as a `tokenizers` pipeline: byte-level BPE
("gpt2") or SentencePiece-style BPE with scores and byte fallback ("llama")."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .tokenizer_error import TokenizerError
from .tokenizer_hf import HFBackend

if TYPE_CHECKING:
    import gguf
    import tokenizers

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


def read_gguf_vocabulary(reader: gguf.GGUFReader) -> dict[str, Any]:
    """Tokenizer's arguments (backend, special tokens, BOS flag, chat template) from the vocabulary stored
    in a GGUF file's metadata (llama.cpp's `tokenizer.*` keys)."""
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
            backend = HFBackend(_build_gguf_byte_level(tokens, merges, types, pre, source))
        else:
            prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
            unk_id = meta.get("tokenizer.ggml.unknown_token_id")
            scores = meta["tokenizer.ggml.scores"]
            backend = HFBackend(_build_gguf_sentencepiece(tokens, scores, types, prefix, unk_id))
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
    return dict(
        backend=backend,
        bos_token=token("bos_token_id"),
        eos_token=token("eos_token_id"),
        pad_token=token("padding_token_id"),
        extra_eos_ids=() if eot is None else (eot,),
        add_bos=add_bos,
        chat_template=meta.get("tokenizer.chat_template"),
        source=source,
    )


def open_gguf(path: Path) -> gguf.GGUFReader:
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
