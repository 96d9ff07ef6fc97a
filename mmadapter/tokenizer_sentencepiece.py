"""SentencePiece `tokenizer.model` files (Meta LLaMA-1/2), run by `sentencepiece`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from .tokenizer_error import TokenizerError

if TYPE_CHECKING:
    import sentencepiece


class SentencePieceBackend:
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


def load_sentencepiece(path: Path) -> sentencepiece.SentencePieceProcessor:
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.Load(str(path))
    except (OSError, RuntimeError) as err:
        raise TokenizerError(
            f"{path} is not a valid SentencePiece model ({err}); re-download tokenizer.model of the model"
        ) from err
    return processor
