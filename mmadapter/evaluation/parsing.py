"""Which option a model's free-text ScienceQA answer chooses ("The answer is (B).", "B", the option text)."""

from __future__ import annotations

import re

from ..data.scienceqa import OPTION_LETTERS

_ANSWER_PHRASE = re.compile(r"\b(?:answer|option|choice)\s+is\s*:?\s*", re.IGNORECASE)
_LEADING_LABEL = re.compile(r"^\s*(?:the\s+)?(?:correct\s+)?answer\s*:\s*", re.IGNORECASE)
_LETTER_AFTER_PHRASE = re.compile(
    r"\(\s*([A-Za-z])\s*\)"                 # (B) or (b)
    r"|([A-Z])(?![A-Za-z0-9])"              # B, B., B: ... (not the start of a word)
    r"|([a-z])(?=\s*(?:[.,;:!)]|$))")       # b. or b at the end (not the article "a")
_LEADING_LETTER = re.compile(r"\(\s*([A-Za-z])\s*\)|([A-Za-z])\s*(?:[.):]|$)")
_PAREN_LETTER = re.compile(r"\(\s*([A-Za-z])\s*\)")


def parse_answer(text: str, choices: list[str]) -> int | None:
    """The option index a model output chooses, or None when it names no valid option.

    In order: an explicit "the answer is X" phrase (the first that names a letter or an option
    wins; a letter beyond the options makes the answer invalid), a leading letter ("B", "(b)",
    "B. text", "Answer: B") or the one parenthesised letter in the text (text with several
    distinct ones, like echoed options, names none), then the option text itself (exact, or the
    one option contained as whole words).
    """
    for match in _ANSWER_PHRASE.finditer(text):
        rest = text[match.end():].lstrip(" \"'*")
        letter = _LETTER_AFTER_PHRASE.match(rest)
        if letter:
            return _letter_index(next(g for g in letter.groups() if g), choices)
        option = _option_at_start(rest, choices)
        if option is not None:
            return option
    stripped = _LEADING_LABEL.sub("", text).strip().strip("\"'*").strip()
    parenthesised = {m.upper() for m in _PAREN_LETTER.findall(text)}
    if len(parenthesised) <= 1:  # several, as in echoed options "(A) x (B) y", name no single letter
        letter = _LEADING_LETTER.match(stripped)
        if letter:
            return _letter_index(next(g for g in letter.groups() if g), choices)
        if parenthesised:
            return _letter_index(parenthesised.pop(), choices)
    return _option_in_text(stripped, choices)


def _letter_index(letter: str, choices: list[str]) -> int | None:
    index = OPTION_LETTERS.index(letter.upper())
    return index if index < len(choices) else None


def _option_at_start(text: str, choices: list[str]) -> int | None:
    """The longest option that `text` starts with (as whole words)."""
    lowered = text.casefold()
    found = [(len(c), i) for i, c in enumerate(choices)
             if c.strip() and re.match(re.escape(c.strip().casefold()) + r"(?!\w)", lowered)]
    return max(found)[1] if found else None


def _option_in_text(text: str, choices: list[str]) -> int | None:
    """The option equal to `text`, else the single option found in it as whole words."""
    lowered = text.casefold().rstrip(".!").strip()
    exact = [i for i, c in enumerate(choices) if c.strip().casefold() == lowered]
    if exact:
        return exact[0] if len(exact) == 1 else None
    contained = [i for i, c in enumerate(choices) if c.strip() and
                 re.search(r"(?<!\w)" + re.escape(c.strip().casefold()) + r"(?!\w)", lowered)]
    # "cats" also contains the option "cat": keep only options not inside another found option
    outer = [i for i in contained
             if not any(j != i and choices[i].strip().casefold() in choices[j].strip().casefold()
                        and choices[i].strip().casefold() != choices[j].strip().casefold() for j in contained)]
    return outer[0] if len(outer) == 1 else None
