"""The Gradio page: a chat with an optional image, sampling controls and an adapter dropdown.

Conversation state is derived from the conversation: the image a question is about is the latest
image in the chat history it is sent with, so an empty history has no image however the chat was
emptied (the button, the chatbot's own clear icon, a new API client, a page reload).

Uploads: Gradio serves an uploaded file to anyone who asks for its path (there is no per-session
check); the path holds a sha256 of a secret seed and the content, so only the uploader learns it.
What this page adds is a short life: a file that is not an image is deleted at once, a session's
uploads are deleted UPLOAD_RELEASE_GRACE_S after its conversation is cleared (button or icon), its page is
closed or reloaded, or after UPLOAD_MAX_AGE_S of inactivity, and Gradio sweeps any upload older than that.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import gradio as gr
from gradio.utils import get_upload_folder

from ..adapter_set import NO_ADAPTER
from ..demo.examples import example_scenes

from .service import WARN, ChatService

EXAMPLES_DIR = Path(__file__).parent / "examples"  # the red circle, and the demo's multi-object pictures
TITLE = "mmadapter — visual question answering with LLaMA-Adapter"
UPLOAD_MAX_AGE_S = 3600  # uploads live at most this long (Gradio's sweep) or this long after the session's last turn
UPLOAD_SWEEP_S = 600
# A file a session lets go of is deleted this long after, unless a session holds it again by then: another user's
# request for the same picture (same content, same path) may already wait in the queue without being registered.
UPLOAD_RELEASE_GRACE_S = 120.0
IMAGE_GONE = "(image no longer available)"


def chat_history(messages: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(question, answer) text pairs from the chatbot's messages; image messages and warnings skipped."""
    pairs, question = [], None
    for m in messages:
        content = m.get("content")
        text = content if isinstance(content, str) else None
        if m.get("role") == "user" and text is not None:
            question = text
        elif m.get("role") == "assistant" and text is not None and question is not None:
            if not text.startswith(WARN):
                pairs.append((question, text))
            question = None
    return pairs


def forget_uploads(paths: Iterable[str] | None) -> None:
    """Delete uploaded files, only ever inside Gradio's upload folder (the paths come from session state)."""
    folder = Path(get_upload_folder()).resolve()
    for name in paths or ():
        path = Path(name).resolve()
        if path.is_relative_to(folder) and path.is_file():
            path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                path.parent.rmdir()  # Gradio keeps each upload in a folder of its own


class SessionUploads:
    """Each browser or API session's uploaded files, so that they can be deleted when its conversation
    ends: cleared, its page closed or reloaded (Gradio's unload event), or its state expired.

    Gradio stores uploads by content, so two sessions that upload the same picture hold the same file: a file
    is deleted only when no other session still holds it, and only `grace_s` after it was let go, because a
    request that uploaded the same picture may still be waiting in the queue, not yet holding it."""

    def __init__(self, grace_s: float = UPLOAD_RELEASE_GRACE_S) -> None:
        self._lock = threading.Lock()
        self._paths: dict[str, list[str]] = {}
        self.grace_s = grace_s

    def add(self, session: str, paths: Iterable[str]) -> None:
        with self._lock:
            self._paths.setdefault(session, []).extend(paths)

    def drop(self, session: str, path: str) -> None:
        """Forget one of the session's files (a rejected upload) and delete it unless another session holds it."""
        with self._lock:
            if path in self._paths.get(session, []):
                self._paths[session] = [p for p in self._paths[session] if p != path]
            unheld = [path] if self._unheld(path) else []
        forget_uploads(unheld)

    def forget(self, session: str | None) -> None:
        """Release the session's uploads (called with the session id a State held, or a request's): each is
        deleted `grace_s` later unless a session holds it by then."""
        with self._lock:
            paths = self._paths.pop(session, []) if session else []
        if paths:
            timer = threading.Timer(self.grace_s, self._delete_unheld, [list(dict.fromkeys(paths))])
            timer.daemon = True
            timer.start()

    def _delete_unheld(self, paths: list[str]) -> None:
        with self._lock:
            unheld = [p for p in paths if self._unheld(p)]
        forget_uploads(unheld)

    def _unheld(self, path: str) -> bool:
        return not any(path in held for held in self._paths.values())

    def sessions(self) -> int:
        with self._lock:
            return len(self._paths)


def conversation_image(messages: list[dict[str, Any]]) -> str | None:
    """The image a new question is about: the latest file a user message of the history carries."""
    for m in reversed(messages):
        if m.get("role") != "user":
            continue
        content = m.get("content")
        parts = content if isinstance(content, list) else [content]
        for part in reversed(parts):
            path = _file_path(part)
            if path is not None:
                return path
    return None


def _file_path(part: Any) -> str | None:
    """The path of a file message part ({"path": ...} or {"type": "file", "file": {"path": ...}})."""
    if not isinstance(part, dict):
        return None
    file = part.get("file") if isinstance(part.get("file"), dict) else part
    path = file.get("path")
    return path if isinstance(path, str) else None


def _without_deleted_files(content: Any) -> Any:
    """A message's content with parts whose file was deleted (cleared elsewhere, expired) replaced by a note."""
    if not isinstance(content, list):
        return content
    return [{"type": "text", "text": IMAGE_GONE} if _is_deleted_file(part) else part for part in content]


def _is_deleted_file(part: Any) -> bool:
    file = part.get("file") if isinstance(part, dict) else None
    path = file.get("path") if isinstance(file, dict) else None
    return isinstance(path, str) and not Path(path).is_file()


def _message_text(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # gradio may normalise content to a list of parts
        texts = [c.get("text") if isinstance(c, dict) else c for c in content]
        texts = [t for t in texts if isinstance(t, str)]
        return texts[0] if len(texts) == 1 else None
    return None


def build_demo(service: ChatService, upload_grace_s: float = UPLOAD_RELEASE_GRACE_S,
               engine_profile: bool = False) -> gr.Blocks:
    """engine_profile: serve the batch engine's timings at the API route /engine_profile (for load tests; off by
    default, since anyone who reaches the app could read when and how much it served)."""
    session_uploads = SessionUploads(upload_grace_s)

    def respond(message: dict[str, Any] | None, messages: list[dict[str, Any]], adapter_name: str,
                temperature: float, top_p: float, max_new_tokens: int,
                request: gr.Request) -> Iterator[tuple[list[dict[str, Any]], Any, str]]:
        session = request.session_hash or ""
        message = message or {}
        text = str(message.get("text") or "")
        files = list(message.get("files") or [])
        messages = [{**m, "content": _message_text(m.get("content")) or _without_deleted_files(m.get("content"))}
                    for m in messages or []]
        history = chat_history(messages)
        if files:
            session_uploads.add(session, files)
            messages.append({"role": "user", "content": {"path": files[-1]}})  # a new upload replaces the image
        image_path = conversation_image(messages)
        if text.strip():
            messages.append({"role": "user", "content": text})
        cleared = gr.MultimodalTextbox(value=None)
        for reply in service.answer(text, image_path, history, adapter_name, temperature=temperature,
                                    top_p=top_p, max_new_tokens=int(max_new_tokens)):
            if reply.image_rejected:  # not an image: delete it now and do not show it
                session_uploads.drop(session, image_path)
                messages = [m for m in messages if _file_path(m.get("content")) != image_path]
            yield messages + [{"role": "assistant", "content": reply.render()}], cleared, session

    def clear(request: gr.Request) -> tuple[list, Any]:
        session_uploads.forget(request.session_hash)
        return [], gr.MultimodalTextbox(value=None)

    def end_session(request: gr.Request) -> None:
        session_uploads.forget(request.session_hash)

    with gr.Blocks(title=TITLE, delete_cache=(UPLOAD_SWEEP_S, UPLOAD_MAX_AGE_S)) as demo:
        gr.Markdown(f"## {TITLE}\nUpload an image (optional) and ask about it. Follow-up questions keep the "
                    "conversation and its image; a new upload replaces the image.")
        status = gr.Markdown(service.status_markdown())
        # Holds only this session's id: when Gradio expires the state, the session's uploads go with it.
        session = gr.State(None, time_to_live=UPLOAD_MAX_AGE_S, delete_callback=session_uploads.forget)
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Chat", height=460)
                box = gr.MultimodalTextbox(placeholder="Ask a question, optionally attach an image…",
                                           show_label=False, file_count="single", sources=["upload"])
            with gr.Column(scale=1):
                names = service.adapters.names()  # the base alone first, then the adapters found
                adapter = gr.Dropdown(names, value=names[1] if len(names) > 1 else names[0],
                                      label="Adapter", info=f"'{NO_ADAPTER}' uses the base model alone")
                temperature = gr.Slider(0.0, 1.5, value=0.0, step=0.05, label="Temperature", info="0 = greedy")
                top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top-p")
                max_new_tokens = gr.Slider(8, 1024, value=256, step=8, label="Max new tokens")
                clear_btn = gr.Button("Clear conversation")
        gr.Examples(
            examples=[[{"text": "What is the capital of France?", "files": []}],
                      [{"text": "Give me three tips for a good night's sleep.", "files": []}],
                      [{"text": "What color is this shape?", "files": [str(EXAMPLES_DIR / "red_circle.png")]}]]
            + [[{"text": question, "files": [str(EXAMPLES_DIR / name)]}] for name, _, question in example_scenes()],
            inputs=[box], label="Examples")
        inputs = [box, chatbot, adapter, temperature, top_p, max_new_tokens]
        box.submit(respond, inputs, [chatbot, box, session], api_name="chat")
        clear_btn.click(clear, None, [chatbot, box], api_name="clear")
        chatbot.clear(clear, None, [chatbot, box], api_name=False)  # the chatbot's own trash icon
        demo.load(service.status_markdown, None, status, api_name=False)
        if engine_profile:  # for load tests (bench/serving.py): timings only, off the queue (a full one would hold it)
            gr.api(service.engine_profile, api_name="engine_profile", api_visibility="undocumented", queue=False)
        demo.unload(end_session)  # page closed or reloaded
    demo.session_uploads = session_uploads  # for tests and the load benchmark
    return demo
