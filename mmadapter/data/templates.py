"""Prompt templates: a conversation as prompt segments (no loss) and response segments (loss).

Training needs to know exactly which characters the model must learn to produce, so a template
renders a conversation as an ordered list of `Segment`s whose concatenation is the full text.
Inference uses `Template.prompt`, which is the same rendering cut where the model starts answering.

Templates (pick one with `get_template(name)`):

"alpaca" -- byte-exact with the reference LLaMA-Adapter (alpaca_finetuning_v1/finetuning.py,
PROMPT_DICT) and tatsu-lab/stanford_alpaca (train.py). With an input:

    "Below is an instruction that describes a task, paired with an input that provides further
    context. Write a response that appropriately completes the request.\\n\\n### Instruction:\\n
    {instruction}\\n\\n### Input:\\n{input}\\n\\n### Response:"

(one line; wrapped here), and without an input (or an empty one, as the reference decides):

    "Below is an instruction that describes a task. Write a response that appropriately completes
    the request.\\n\\n### Instruction:\\n{instruction}\\n\\n### Response:"

The response follows immediately (no separator) and then EOS, as the reference encodes
`prompt + output` with `eos=True`. Multi-turn (our extension; the reference is single-turn): each
later turn appends "\\n\\n### Instruction:\\n{instruction}\\n\\n### Response:" after the previous
response's EOS, and every response ends with EOS so the model learns to stop after each answer.

"chat" -- the base model's own chat template (`tokenizer.apply_chat_template`), e.g. ChatML for
SmolLM2. Each response segment runs to the end-of-turn marker inclusive ("...<|im_end|>"), so the
model learns to stop; whitespace the template writes after the marker ("\\n") is a prompt segment,
because generation stops at the marker and never produces it. Segments are found by rendering
growing prefixes of the conversation, so their concatenation is exactly the rendering of the whole.

"chat-short" -- "chat" with an empty system turn, so templates that insert a default system prompt
when none is given leave it out (SmolLM2: 20 tokens around "What color is the square?" instead of 36,
22 of them its default system prompt). For adapters trained on short answers, where most of every
step would otherwise be spent on the same system text; the adapter file records it, so the app and
the API prompt it the same way.

"plain" -- the instruction as is, the response straight after it, then EOS; turns are simply
concatenated. For data that carries its own formatting, or captioning-style prompts.

An Alpaca `input` (extra context of the first turn) gets its own section in "alpaca"; the other
templates append it to the first instruction after a blank line ("{instruction}\\n\\n{input}").
The EOS of "alpaca"/"plain" is written as the EOS token's text (e.g. "</s>", "<|im_end|>"), which
the tokenizer maps back to the special id, so prompts with history stay plain strings.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol

Turn = tuple[str, "str | None"]  # (user text, assistant text); None: the turn the model answers now

ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
ALPACA_NEXT_TURN = "\n\n### Instruction:\n{instruction}\n\n### Response:"


class TemplateError(ValueError):
    """A conversation or tokenizer that a template cannot render."""


class Segment(NamedTuple):
    text: str
    loss: bool  # True: the model learns to produce this text (a response)


class ChatTokenizer(Protocol):
    """The part of `mmadapter.tokenizer.Tokenizer` that templates use."""

    eos_ids: tuple[int, ...]
    chat_template: str | None

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str: ...

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str: ...


class Template:
    """Base: subclasses implement `render`; `prompt` is shared."""

    name = "base"

    def render(self, turns: Sequence[Turn], tokenizer: ChatTokenizer | None = None,
               input: str | None = None) -> list[Segment]:
        """Segments of a conversation; the last turn's answer may be None (ends with its prompt)."""
        raise NotImplementedError

    def prompt(self, instruction: str, input: str | None = None, history: Sequence[tuple[str, str]] = (),
               tokenizer: ChatTokenizer | None = None) -> str:
        """Text that ends where the model should start answering `instruction`."""
        turns: list[Turn] = [*history, (instruction, None)]
        return "".join(segment.text for segment in self.render(turns, tokenizer, input=input))

    def __repr__(self) -> str:
        return f"<Template {self.name!r}>"


class AlpacaTemplate(Template):
    name = "alpaca"

    def render(self, turns: Sequence[Turn], tokenizer: ChatTokenizer | None = None,
               input: str | None = None) -> list[Segment]:
        _check_turns(turns)
        segments: list[Segment] = []
        for i, (user, assistant) in enumerate(turns):
            if i > 0:
                segments.append(Segment(ALPACA_NEXT_TURN.format(instruction=user), False))
            elif input:  # the reference treats an empty input as no input
                segments.append(Segment(ALPACA_PROMPT_INPUT.format(instruction=user, input=input), False))
            else:
                segments.append(Segment(ALPACA_PROMPT_NO_INPUT.format(instruction=user), False))
            if assistant is not None:
                segments.append(Segment(assistant + eos_text(tokenizer), True))
        return segments


class PlainTemplate(Template):
    name = "plain"

    def render(self, turns: Sequence[Turn], tokenizer: ChatTokenizer | None = None,
               input: str | None = None) -> list[Segment]:
        _check_turns(turns)
        segments: list[Segment] = []
        for i, (user, assistant) in enumerate(turns):
            segments.append(Segment(_with_input(user, input if i == 0 else None), False))
            if assistant is not None:
                segments.append(Segment(assistant + eos_text(tokenizer), True))
        return segments


class ChatTemplate(Template):
    name = "chat"
    system: str | None = None  # a system turn placed first (None: whatever the tokenizer's template does)

    def render(self, turns: Sequence[Turn], tokenizer: ChatTokenizer | None = None,
               input: str | None = None) -> list[Segment]:
        _check_turns(turns)
        if tokenizer is None or tokenizer.chat_template is None:
            raise TemplateError("template 'chat' needs a tokenizer with a chat template; "
                                "this one has none: use template 'alpaca' or 'plain'")
        messages: list[dict[str, str]] = [] if self.system is None else [{"role": "system", "content": self.system}]
        segments: list[Segment] = []
        rendered = ""  # text of the conversation so far
        for i, (user, assistant) in enumerate(turns):
            messages.append({"role": "user", "content": _with_input(user, input if i == 0 else None)})
            with_prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            segments.append(Segment(_extension(rendered, with_prompt), False))
            rendered = with_prompt
            if assistant is None:
                break
            messages.append({"role": "assistant", "content": assistant})
            with_reply = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
            reply = _extension(rendered, with_reply)
            answer = reply.rstrip()  # up to and including the end-of-turn marker
            _check_end_marker(answer, assistant)
            segments.append(Segment(answer, True))
            if len(answer) < len(reply):
                segments.append(Segment(reply[len(answer):], False))
            rendered = with_reply
        return _merge_adjacent(segments)


class ShortChatTemplate(ChatTemplate):
    name = "chat-short"
    system = ""


TEMPLATES: dict[str, Template] = {t.name: t for t in (AlpacaTemplate(), ChatTemplate(), ShortChatTemplate(),
                                                      PlainTemplate())}


def get_template(name: str | Template) -> Template:
    if isinstance(name, Template):
        return name
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; known templates: {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[name]


def eos_text(tokenizer: ChatTokenizer | None) -> str:
    """The EOS token as text; the tokenizer encodes it back to the special id."""
    if tokenizer is None:
        raise TemplateError("a tokenizer is needed to write EOS after a response (pass tokenizer=...)")
    if not tokenizer.eos_ids:
        raise TemplateError("the tokenizer has no EOS token; a trained model could not learn to stop")
    return tokenizer.decode([tokenizer.eos_ids[0]], skip_special=False)


def _check_turns(turns: Sequence[Turn]) -> None:
    if not turns:
        raise TemplateError("a conversation needs at least one turn")
    for i, (user, assistant) in enumerate(turns):
        if not isinstance(user, str) or not (assistant is None or isinstance(assistant, str)):
            raise TemplateError(f"turn {i} must be (str, str | None), got ({type(user).__name__}, "
                                f"{type(assistant).__name__})")
        if assistant is None and i != len(turns) - 1:
            raise TemplateError(f"turn {i} has no answer; only the last turn may be unanswered")


def _with_input(instruction: str, input: str | None) -> str:
    return f"{instruction}\n\n{input}" if input else instruction


def _extension(prefix: str, text: str) -> str:
    if not text.startswith(prefix):
        raise TemplateError("the chat template renders earlier turns differently once later turns are added, "
                            "so response tokens cannot be masked exactly; use template 'alpaca' or 'plain'")
    return text[len(prefix):]


def _check_end_marker(answer: str, content: str) -> None:
    """A reply that ends with the bare content has no end-of-turn marker: the model would never stop."""
    if content.strip() and answer.endswith(content.strip()):
        raise TemplateError("the chat template writes no end-of-turn marker after an assistant message; "
                            "use template 'alpaca' or 'plain', which end responses with EOS")


def _merge_adjacent(segments: list[Segment]) -> list[Segment]:
    merged: list[Segment] = []
    for segment in segments:
        if not segment.text:
            continue
        if merged and merged[-1].loss == segment.loss:
            merged[-1] = Segment(merged[-1].text + segment.text, segment.loss)
        else:
            merged.append(segment)
    return merged
