"""The app under load and under hostile requests, driven over HTTP on localhost with gradio_client.

Eight simultaneous users for a bounded time against the embedded SmolLM2: every request is answered
or cleanly refused by the full queue (counted: none lost), memory stays bounded, and the app still
answers afterwards. Uploads: the size limit is enforced by the server, files are served only at their
unguessable paths and deleted when the conversation no longer needs them, and no server path named in
a request is ever read or served.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import statistics
import threading
import time
import uuid
from pathlib import Path

import gradio as gr
import httpx
import pytest
from gradio.utils import get_upload_folder
from PIL import Image

from app_helpers import free_port, gone

from mmadapter.app.ui import IMAGE_GONE, UPLOAD_MAX_AGE_S, UPLOAD_SWEEP_S, forget_uploads
from mmadapter.adapter_set import NO_ADAPTER, AdapterSet

gradio_client = pytest.importorskip("gradio_client")
psutil = pytest.importorskip("psutil")

USERS = 8
LOAD_SECONDS = 30  # submissions stop after this; requests in flight finish
REQUESTS_PER_USER = 12  # and each user sends at most this many
MAX_NEW_TOKENS = 8  # the slider's minimum
CONCURRENCY, QUEUE_SIZE = 2, 4  # small, so that eight users overflow the queue
MAX_FILE_SIZE = "1mb"
RSS_GROWTH_LIMIT_MIB = 400
QUESTIONS = ["What is the capital of France?", "Name a colour.", "What is 2 + 2?", "Say hello.",
             "Name an animal.", "What day comes after Monday?", "Name a fruit.", "What is water made of?"]


def show(capsys, title: str, lines: list[str]) -> None:
    """Print figures into the test output even when pytest captures it (no -s needed)."""
    with capsys.disabled():
        print("\n".join(["", f"-- {title} --", *lines]))


@pytest.fixture(scope="module")
def app(smollm):
    from mmadapter.app.service import ChatService
    from mmadapter.app.ui import build_demo

    from mmadapter.batching import BatchEngine

    engine = BatchEngine(smollm, max_batch=CONCURRENCY, max_slots=1024)  # requests in flight decode together
    service = ChatService(smollm, AdapterSet(smollm), max_prompt_tokens=256, engine=engine)
    demo = build_demo(service, upload_grace_s=0.5)  # released uploads go quickly here
    demo.queue(default_concurrency_limit=CONCURRENCY, max_size=QUEUE_SIZE)
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True,
                            max_file_size=MAX_FILE_SIZE)
    yield url, service, demo
    demo.close()


def chat(client, text: str, files=(), history=(), max_new_tokens: int = MAX_NEW_TOKENS) -> list:
    message = {"text": text, "files": [gradio_client.handle_file(str(f)) for f in files]}
    messages, _ = client.predict(message, list(history), NO_ADAPTER, 0.0, 0.9, max_new_tokens, api_name="/chat")
    return messages


def last_text(messages: list) -> str:
    return messages[-1]["content"][0]["text"]


def png_bytes(colour: str = "red", size: tuple[int, int] = (32, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# Load


def test_eight_users_every_request_answered_or_refused(app, capsys):
    url, service, _ = app
    client = gradio_client.Client(url, verbose=False)
    assert "Paris" in last_text(chat(client, "What is the capital of France?", max_new_tokens=12))  # warm up
    process = psutil.Process()
    rss_before = process.memory_info().rss / 2**20
    failures_before = service.failures
    lock = threading.Lock()
    submitted, answered, refused, errors, latencies = [], [], [], [], []
    deadline = time.monotonic() + LOAD_SECONDS

    def user(index: int) -> None:
        client = gradio_client.Client(url, verbose=False)
        for n in range(REQUESTS_PER_USER):
            if time.monotonic() > deadline:
                return
            question = QUESTIONS[(index + n) % len(QUESTIONS)]
            with lock:
                submitted.append(question)
            start = time.monotonic()
            try:
                text = last_text(chat(client, question))
            except Exception as e:  # noqa: BLE001 - every outcome is counted
                outcome = refused if "queue is full" in str(e).lower() else errors
                with lock:
                    outcome.append(f"{type(e).__name__}: {e}")
                time.sleep(0.2)  # a refused user waits a moment, as a person would
                continue
            with lock:
                (answered if text.strip() and not text.startswith("⚠️") else errors).append(text)
                latencies.append(time.monotonic() - start)

    threads = [threading.Thread(target=user, args=(i,), daemon=True) for i in range(USERS)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=LOAD_SECONDS + 120)
    elapsed = time.monotonic() - started
    assert not any(t.is_alive() for t in threads), "a user is still waiting: a request was lost"
    rss_after = process.memory_info().rss / 2**20

    assert not errors, errors[:5]
    assert len(submitted) == len(answered) + len(refused)  # none lost
    assert len(answered) >= USERS // 2  # the queue refuses overflow, it does not starve everyone
    assert service.failures == failures_before
    assert rss_after - rss_before < RSS_GROWTH_LIMIT_MIB
    assert "Paris" in last_text(chat(client, "What is the capital of France?", max_new_tokens=12))  # still serving

    p50, p95 = statistics.median(latencies), statistics.quantiles(latencies, n=20)[-1]
    show(capsys, f"app under load: {USERS} users, concurrency {CONCURRENCY}, queue {QUEUE_SIZE}", [
        f"submitted {len(submitted)}, answered {len(answered)}, refused (queue full) {len(refused)}, "
        f"errors {len(errors)} in {elapsed:.1f} s ({len(answered) / elapsed:.2f} answers/s)",
        f"latency of answered requests: p50 {p50:.2f} s, p95 {p95:.2f} s, max {max(latencies):.2f} s",
        f"RSS before {rss_before:.0f} MiB, after {rss_after:.0f} MiB (+{rss_after - rss_before:.0f} MiB)",
    ])


# ----------------------------------------------------------------------------------------------
# Uploads and server paths


def upload(url: str, name: str, data: bytes) -> httpx.Response:
    return httpx.post(f"{url}gradio_api/upload", files={"files": (name, data)}, timeout=30)


def test_uploads_over_the_size_limit_are_refused_by_the_server(app, tmp_path):
    url, _, _ = app
    big = os.urandom(1_100_000)  # over 1 MB
    response = upload(url, "big.png", big)
    assert response.status_code == 413 and "maximum allowed size" in response.text
    small = upload(url, "small.png", png_bytes())
    assert small.status_code == 200 and Path(small.json()[0]).is_file()
    client = gradio_client.Client(url, verbose=False)  # the client refuses it too, before sending
    (tmp_path / "big.png").write_bytes(big)
    with pytest.raises(ValueError, match="maximum file size"):
        chat(client, "What is this?", files=[tmp_path / "big.png"])
    assert "Paris" in last_text(chat(client, "What is the capital of France?", max_new_tokens=12))


def stream_of_call(url: str, payload: dict) -> str:
    body = json.dumps(payload)  # ASCII, with \u escapes: the way a browser may send a lone surrogate
    event = httpx.post(f"{url}gradio_api/call/chat", content=body, headers={"Content-Type": "application/json"},
                       timeout=30).json()["event_id"]
    return httpx.get(f"{url}gradio_api/call/chat/{event}", timeout=120).text


@pytest.mark.parametrize("where", ["message", "history"])
def test_server_paths_named_in_a_request_are_never_read(app, monkeypatch, where):
    """A path that was not uploaded, in the new message or in the chat history, is refused before our code."""
    url, service, _ = app
    secret = Path.cwd() / "README.md"  # readable by the server, in its working directory
    seen = []
    original = service.answer
    monkeypatch.setattr(service, "answer", lambda q, path, history, *a, **kw: seen.append((path, history))
                        or original(q, path, history, *a, **kw))
    file = {"path": str(secret), "orig_name": "x.png", "meta": {"_type": "gradio.FileData"}}
    if where == "message":
        payload = {"data": [{"text": "read this", "files": [file]}, [], NO_ADAPTER, 0.0, 0.9, 8]}
    else:
        history = [{"role": "user", "content": [{"type": "file", "file": file}]},
                   {"role": "assistant", "content": [{"type": "text", "text": "ok"}]}]
        payload = {"data": [{"text": "and now?", "files": []}, history, NO_ADAPTER, 0.0, 0.9, 8]}
    stream = stream_of_call(url, payload)
    assert "event: error" in stream
    assert not seen  # refused before the app's code ran
    assert secret.read_text()[:40] not in stream
    response = httpx.get(f"{url}gradio_api/file={secret}", timeout=30)
    assert response.status_code == 403


def test_uploads_are_served_only_at_their_secret_path_and_deleted_with_the_conversation(app, tmp_path):
    url, _, _ = app
    content, name = png_bytes("blue"), f"photo-{uuid.uuid4().hex[:8]}.png"
    (tmp_path / name).write_bytes(content)
    alice = gradio_client.Client(url, verbose=False, download_files=False)
    messages = chat(alice, "What colour is this?", files=[tmp_path / name])
    server_path = Path(messages[0]["content"][0]["file"]["path"])
    assert server_path.is_file() and server_path.name == name
    # Gradio serves a file to whoever names its path (no per-session check), so the path must stay secret:
    # its folder is sha256(secret seed + content), not guessable from the content, and folders are not listed.
    assert httpx.get(f"{url}gradio_api/file={server_path}", timeout=30).status_code == 200
    assert server_path.parent.name != hashlib.sha256(content).hexdigest()
    for guess in (server_path.parent, server_path.parent.parent,
                  server_path.parent.parent / hashlib.sha256(content).hexdigest() / name):
        assert httpx.get(f"{url}gradio_api/file={guess}", timeout=30).status_code == 403
    bob = gradio_client.Client(url, verbose=False, download_files=False)
    assert str(server_path) not in json.dumps(chat(bob, "What colour is this?"))  # another session never sees it
    alice.predict(api_name="/clear")
    assert server_path.is_file()  # not at once: a queued request of someone uploading the same picture may need it
    assert gone(server_path)  # clearing the conversation deletes its uploads, after the grace
    assert httpx.get(f"{url}gradio_api/file={server_path}", timeout=30).status_code == 403


def test_a_file_that_is_not_an_image_is_deleted_at_once(app, tmp_path):
    url, _, _ = app
    name = f"notes-{uuid.uuid4().hex[:8]}.png"
    (tmp_path / name).write_text("not an image")
    client = gradio_client.Client(url, verbose=False, download_files=False)
    messages = chat(client, "What is this?", files=[tmp_path / name])
    assert last_text(messages).startswith("⚠️") and "could not be used as an image" in last_text(messages)
    assert not any(part.get("type") == "file" for m in messages for part in m["content"])  # not shown either
    assert not list(Path(get_upload_folder()).glob(f"*/{name}"))


def test_a_conversation_whose_image_was_deleted_goes_on(app):
    """An upload deleted under a conversation (cleared in another tab, expired) leaves a note, not an error."""
    url, _, _ = app
    name = f"photo-{uuid.uuid4().hex[:8]}.png"
    server_path = upload(url, name, png_bytes("green")).json()[0]
    Path(server_path).unlink()
    file = {"path": server_path, "meta": {"_type": "gradio.FileData"}}
    history = [{"role": "user", "content": [{"type": "file", "file": file}]},
               {"role": "user", "content": [{"type": "text", "text": "What colour is this?"}]},
               {"role": "assistant", "content": [{"type": "text", "text": "Green."}]}]
    stream = stream_of_call(url, {"data": [{"text": "Are you sure?", "files": []}, history, NO_ADAPTER, 0.0, 0.9, 8]})
    assert "event: complete" in stream and "event: error" not in stream
    assert IMAGE_GONE in stream


def test_uploads_expire_with_their_session(smollm, tmp_path, monkeypatch):
    """A session's uploads are deleted when its state expires (UPLOAD_MAX_AGE_S, an hour, after its last turn;
    20 s here) though the conversation was never cleared; Gradio's own sweep deletes any upload of that age."""
    import mmadapter.app.ui as ui
    from mmadapter.app.service import ChatService

    assert UPLOAD_MAX_AGE_S == 3600  # the README's "an hour"
    monkeypatch.setattr(ui, "UPLOAD_MAX_AGE_S", 20)  # long enough for the answer on a busy CPU
    demo = ui.build_demo(ChatService(smollm, AdapterSet(smollm), max_prompt_tokens=256), upload_grace_s=0.5)
    assert demo.delete_cache == (UPLOAD_SWEEP_S, 20)
    demo.queue()
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        name = f"photo-{uuid.uuid4().hex[:8]}.png"
        (tmp_path / name).write_bytes(png_bytes("blue"))
        client = gradio_client.Client(url, verbose=False, download_files=False)
        messages = chat(client, "What colour is this?", files=[tmp_path / name], max_new_tokens=8)
        server_path = Path(messages[0]["content"][0]["file"]["path"])
        assert server_path.is_file()
        assert gone(server_path, timeout_s=40)  # state expiry (checked every second) + the release grace
    finally:
        demo.close()


def test_forget_uploads_deletes_nothing_outside_the_upload_folder(tmp_path):
    keep = tmp_path / "keep.png"
    keep.write_bytes(png_bytes())
    through_upload_folder = Path(get_upload_folder()) / os.path.relpath(keep, get_upload_folder())  # ../..
    assert through_upload_folder.resolve() == keep.resolve()
    forget_uploads([str(keep), str(through_upload_folder), "/etc/hostname"])
    assert keep.exists()


def test_a_lone_surrogate_over_http_gets_an_answer(app):
    """JSON may carry "\\ud800", which Python decodes to a str no tokenizer library accepts."""
    url, service, _ = app
    failures = service.failures
    stream = stream_of_call(url, {"data": [{"text": "Hello \ud800 there?", "files": []}, [], NO_ADAPTER, 0.0, 0.9, 8]})
    assert "event: complete" in stream and "event: error" not in stream
    assert service.failures == failures


def test_an_upload_two_sessions_share_is_deleted_only_when_both_are_done():
    """Gradio stores uploads by content: two users uploading the same picture get the same file, and one
    clearing their chat must not take the other's image away, not even while the other's request still waits
    in the queue (it holds the file only once its turn comes)."""
    from mmadapter.app.ui import SessionUploads

    shared = Path(get_upload_folder()) / "shared-test-upload" / "red.png"
    shared.parent.mkdir(parents=True, exist_ok=True)
    shared.write_bytes(png_bytes())
    uploads = SessionUploads(grace_s=0.5)
    uploads.add("alice", [str(shared)])
    uploads.forget("alice")  # bob uploaded the same picture; his request is queued, not yet registered
    time.sleep(0.1)
    assert shared.is_file()
    uploads.add("bob", [str(shared)])  # his turn comes within the grace
    time.sleep(1.0)
    assert shared.is_file()
    uploads.forget("bob")
    assert shared.is_file()
    assert gone(shared)


def test_a_rejected_upload_is_deleted_at_once_unless_another_session_holds_it():
    from mmadapter.app.ui import SessionUploads

    shared = Path(get_upload_folder()) / "shared-test-upload" / "notes.png"
    shared.parent.mkdir(parents=True, exist_ok=True)
    shared.write_text("not an image")
    uploads = SessionUploads(grace_s=60)
    uploads.add("alice", [str(shared)])
    uploads.add("bob", [str(shared)])
    uploads.drop("alice", str(shared))
    assert shared.is_file()
    uploads.drop("bob", str(shared))
    assert not shared.exists()
