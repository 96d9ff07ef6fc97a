"""What the app does, without the UI: answer a chat turn about an optional image, never crash.

Every failure a user can cause (an empty question, a file that is not an image, a truncated or huge
image, a question longer than the context) becomes a friendly message in the chat; the next
request works as usual. Uploaded files are read only through `mmadapter.images.load_image` from the
path Gradio gives for the upload — never from a path typed by the user.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..adapter_set import NO_ADAPTER, AdapterSet
from ..batching import BatchEngine
from ..config import SELF_CONTAINED_TOWERS
from ..images import ImageError, load_image
from ..model import MMAdapter

log = logging.getLogger(__name__)

WARN = "⚠️ "


@dataclass
class Reply:
    """One streamed state of the assistant's answer: its text so far and an optional note."""

    text: str
    note: str | None = None
    image_rejected: bool = False  # the upload was not a usable image: forget it for this conversation
    notice: str | None = None  # shown above the answer, before it streams (e.g. "this adapter cannot see")

    def render(self) -> str:
        head = f"_{self.notice}_\n\n" if self.notice else ""
        if not self.note:
            return head + self.text
        if not self.text:
            return head + WARN + self.note
        return f"{head}{self.text}\n\n_({self.note})_"


class ChatService:
    def __init__(self, model: MMAdapter, adapters: AdapterSet, max_prompt_tokens: int = 2048,
                 max_image_pixels: int = 40_000_000, engine: BatchEngine | None = None,
                 image_adapter: str | None = None, status_notes: Sequence[str] = ()) -> None:
        """engine: decode requests together; image_adapter: the adapter that answers image questions when the
        selected one cannot see; status_notes: extra lines for the status (e.g. what the demo tower knows)."""
        self.model, self.adapters, self.engine = model, adapters, engine
        self.image_adapter, self.status_notes = image_adapter, list(status_notes)
        self.max_prompt_tokens, self.max_image_pixels = max_prompt_tokens, max_image_pixels
        self._lock = threading.Lock()  # guards the counters only; requests run concurrently
        self.requests = self.failures = 0

    def status_markdown(self) -> str:
        """What is loaded, with a visible warning when the image tower has random weights."""
        m = self.model
        lines = [f"**Base:** `{m.base_name}` ({m.base.config.n_layers} layers, dim {m.base.config.dim})"]
        towers = list({id(t): t for t in (m.vision, *m.towers.values()) if t is not None}.values())
        if not towers:
            lines.append("**Vision tower:** none — images need a multimodal adapter")
        for tower in towers:  # each multimodal adapter has the tower it was trained with
            weights = Path(tower.config.pretrained).name if tower.config.pretrained else "random"  # no server paths
            lines.append(f"**Vision tower:** `{Path(tower.config.model).name}` ({weights})")
            if tower.config.pretrained is None and not tower.config.model.startswith(SELF_CONTAINED_TOWERS):
                lines.append(f"{WARN}**The vision tower `{tower.config.model}` has random weights: answers about "
                             "images are meaningless.** Its adapters were trained over it; train one over real CLIP "
                             "weights (`--vision ViT-L-14:openai`) for images that mean something.")
        shown = [f"`{n}`" + (f" ({a.variant})" if (a := self.adapters.get(n)) is not None else "")
                 for n in self.adapters.names()]
        lines.append(f"**Adapters:** {', '.join(shown)}")
        if self.engine is not None:
            lines.append(self.engine_status())
        lines += self.status_notes
        for path, error in self.adapters.errors.items():
            lines.append(f"{WARN}`{Path(path).name}` could not be loaded: {error}")
        return "  \n".join(lines)

    def engine_status(self) -> str:
        """How concurrent requests are served: batch size, prefill chunk, the reuse cache's budget and use."""
        e = self.engine
        chunk = f"prompts prefilled {e.prefill_chunk} tokens at a time" if e.prefill_chunk else "whole prompts prefilled"
        line = f"**Serving:** up to {e.max_batch} requests decoded together; {chunk}; "
        if e.reuse is None:
            return line + "K/V of earlier turns not reused"
        s = e.reuse.stats()
        return line + (f"K/V of earlier turns reused ({s['stored_mb']:.1f} of {s['max_mb']:.0f} MiB, "
                       f"{s['reused_tokens']:,} of {s['prompt_tokens']:,} prompt tokens so far)")

    def engine_profile(self) -> dict:
        """Where the batch engine's time went since it started (`BatchEngine.stats`: seconds and token counts per
        request and in all, no text); {} when requests decode one at a time."""
        return self.engine.stats() if self.engine is not None else {}

    def answer(self, question: str, image_path: str | None, history: Sequence[tuple[str, str]],
               adapter_name: str = NO_ADAPTER, *, temperature: float = 0.0, top_p: float = 1.0,
               max_new_tokens: int = 256) -> Iterator[Reply]:
        """Stream the answer to one turn. Never raises for bad input: yields a Reply with a note instead."""
        with self._lock:
            self.requests += 1
        question = (question or "").strip()
        if not question:
            yield Reply("", "Please type a question." + (" The image is kept for your next question."
                                                         if image_path else ""))
            return
        try:
            adapter = self.adapters.get(adapter_name)
        except ValueError:
            yield Reply("", f"Unknown adapter {adapter_name!r}; pick one from the list.")
            return
        image, note, notice = None, None, None
        if image_path is not None:
            try:
                image = load_image(image_path, max_pixels=self.max_image_pixels)
            except ImageError as e:
                yield Reply("", f"That file could not be used as an image: {_user_message(e, image_path)}. "
                                "Please upload a PNG, JPEG, WebP or similar picture.", image_rejected=True)
                return
            if (adapter is None or adapter.projector is None) and self.image_adapter is not None:
                adapter = self.adapters.get(self.image_adapter)
                notice = f"Answered by the `{self.image_adapter}` adapter: the selected one cannot see images."
            elif adapter is None or adapter.projector is None:
                image = None
                notice = ("The selected adapter cannot see images: the answer below ignores the image. "
                          "Pick a multimodal adapter to ask about it.")
                yield Reply("", notice=notice)  # said before any text is generated
        try:
            question, history, cut = self.model.fit_prompt(question, history, self.max_prompt_tokens, adapter=adapter)
            note = "; ".join(n for n in (note, cut) if n) or None
            text = ""
            stream = self.model.stream if self.engine is None else self.engine.stream
            for piece in stream(question, image, history=history, adapter=adapter,
                                max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p):
                text += piece
                yield Reply(text, note, notice=notice)
            yield Reply(text or "(no answer)", note, notice=notice)
        except (ValueError, RuntimeError) as e:  # a bad setting or an internal failure: report, keep serving
            with self._lock:
                self.failures += 1
            log.exception("request failed")
            yield Reply("", f"Sorry, that request failed: {e}")


def _user_message(error: Exception, path: str) -> str:
    """The error without the server-side upload path (it means nothing to the user)."""
    return str(error).replace(str(path), "the upload")
