"""The Gradio page: a chat with an optional image, sampling controls and an adapter dropdown.

Uploads: Gradio serves an uploaded file to anyone who asks for its path (there is no per-session
check); the path holds a sha256 of a secret seed and the content, so only the uploader learns it.
What this page adds is a short life: a file that is not an image is deleted at once, a session's
uploads are deleted when its conversation is cleared or after UPLOAD_MAX_AGE_S of inactivity, and
Gradio sweeps any upload older than that.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import gradio as gr
from gradio.utils import get_upload_folder

from mmadapter.adapter_set import NO_ADAPTER

from .service import WARN, ChatService

EXAMPLES_DIR = Path(__file__).parent / "examples"
TITLE = "mmadapter — visual question answering with LLaMA-Adapter"
UPLOAD_MAX_AGE_S = 3600  # uploads live at most this long (Gradio's sweep) or this long after the session's last turn
UPLOAD_SWEEP_S = 600
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


def build_demo(service: ChatService) -> gr.Blocks:
    def respond(message: dict[str, Any] | None, messages: list[dict[str, Any]], image_path: str | None,
                uploads: list[str], adapter_name: str, temperature: float, top_p: float,
                max_new_tokens: int) -> Iterator[tuple[list[dict[str, Any]], str | None, Any, list[str]]]:
        message = message or {}
        text = str(message.get("text") or "")
        files = list(message.get("files") or [])
        messages = [{**m, "content": _message_text(m.get("content")) or _without_deleted_files(m.get("content"))}
                    for m in messages or []]
        history = chat_history(messages)
        uploads = list(uploads or [])
        if files:
            image_path = files[-1]  # a new upload replaces the conversation's image
            uploads += files
            messages.append({"role": "user", "content": {"path": image_path}})
        if text.strip():
            messages.append({"role": "user", "content": text})
        cleared = gr.MultimodalTextbox(value=None)
        for reply in service.answer(text, image_path, history, adapter_name, temperature=temperature,
                                    top_p=top_p, max_new_tokens=int(max_new_tokens)):
            if reply.image_rejected:  # not an image: delete it now and do not show it
                forget_uploads([image_path])
                messages = [m for m in messages if m.get("content") != {"path": image_path}]
                uploads = [u for u in uploads if u != image_path]
                image_path = None
            yield messages + [{"role": "assistant", "content": reply.render()}], image_path, cleared, uploads

    def clear(uploads: list[str]) -> tuple[list, None, Any, list]:
        forget_uploads(uploads)
        return [], None, gr.MultimodalTextbox(value=None), []

    with gr.Blocks(title=TITLE, delete_cache=(UPLOAD_SWEEP_S, UPLOAD_MAX_AGE_S)) as demo:
        gr.Markdown(f"## {TITLE}\nUpload an image (optional) and ask about it. Follow-up questions keep the "
                    "conversation and its image; a new upload replaces the image.")
        status = gr.Markdown(service.status_markdown())
        image_state = gr.State(None)  # server-side path of this session's uploaded image
        uploads = gr.State([], time_to_live=UPLOAD_MAX_AGE_S, delete_callback=forget_uploads)  # this session's files
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
                      [{"text": "What color is this shape?", "files": [str(EXAMPLES_DIR / "red_circle.png")]}],
                      [{"text": "Describe this image.", "files": [str(EXAMPLES_DIR / "blue_rectangle.png")]}]],
            inputs=[box], label="Examples")
        inputs = [box, chatbot, image_state, uploads, adapter, temperature, top_p, max_new_tokens]
        box.submit(respond, inputs, [chatbot, image_state, box, uploads], api_name="chat")
        clear_btn.click(clear, uploads, [chatbot, image_state, box, uploads], api_name="clear")
        demo.load(service.status_markdown, None, status, api_name=False)
    return demo
