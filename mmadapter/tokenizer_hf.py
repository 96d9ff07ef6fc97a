"""Hugging Face tokenizers: `tokenizer.json` run by the `tokenizers` library, and the special tokens, BOS
flag, chat template and EOS ids of the config files beside it (`tokenizer_config.json`,
`special_tokens_map.json`, `generation_config.json`, `chat_template.jinja`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .safe_io import read_json_object
from .tokenizer_error import TokenizerError

if TYPE_CHECKING:
    import tokenizers


class HFBackend:
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



def load_hf_tokenizer(path: Path) -> tokenizers.Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    try:
        return HFTokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception on bad JSON
        raise TokenizerError(
            f"{path} is not a valid tokenizer.json ({err}); re-download the tokenizer files of the model"
        ) from err


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


def read_hf_metadata(folder: Path) -> dict[str, Any]:
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
