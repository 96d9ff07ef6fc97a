"""The Gradio app, driven over HTTP with the official gradio_client on localhost."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image
from app_helpers import chromium_driver, free_port, gone
from test_vision import TINY_VIT, register_tiny_models, save_reference

from mmadapter import AdapterConfig, VisionConfig
from mmadapter.adapter_file import save_adapter
from mmadapter.adapter_set import NO_ADAPTER, AdapterSet

gradio_client = pytest.importorskip("gradio_client")


@pytest.fixture(scope="module")
def adapters_dir(smollm, tmp_path_factory):
    """Two adapters over the embedded base: a text one and a multimodal one (tiny random tower)."""
    from mmadapter.model import build_model

    d = tmp_path_factory.mktemp("adapters")
    register_tiny_models(tmp_path_factory.mktemp("clip_cfg"))
    weights = tmp_path_factory.mktemp("clip") / "tiny_vit.safetensors"
    save_reference(TINY_VIT, weights, seed=0)
    build_model(smollm, AdapterConfig(n_prompts=10, n_layers=4), seed=1)
    with torch.no_grad():
        smollm.adapter.gates.fill_(0.3)
    save_adapter(smollm, d / "text-open-gates.safetensors")
    build_model(smollm, AdapterConfig(n_prompts=10, n_layers=4),
                VisionConfig(model=TINY_VIT, pretrained=str(weights), projector_hidden=32), seed=2)
    with torch.no_grad():
        smollm.adapter.gates.fill_(0.3)
    save_adapter(smollm, d / "vision.safetensors")
    smollm.use_adapter(None)  # leave the shared text-only base as we found it
    smollm.detach_vision()
    (d / "broken.safetensors").write_bytes(b"not a safetensors file")
    return d


@pytest.fixture(scope="module")
def app_url(smollm, adapters_dir):
    from mmadapter.app.service import ChatService
    from mmadapter.app.ui import build_demo

    service = ChatService(smollm, AdapterSet.from_folder(smollm, adapters_dir), max_prompt_tokens=256)
    demo = build_demo(service, upload_grace_s=1.0)  # deletions the browser test waits for come quickly
    demo.queue(default_concurrency_limit=2, max_size=16)
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    yield url, service
    demo.close()
    smollm.detach_vision()


def ask(url: str, text: str, files=(), adapter=NO_ADAPTER, history=(), max_new_tokens=24) -> tuple[list, str]:
    client = gradio_client.Client(url, verbose=False)
    message = {"text": text, "files": [gradio_client.handle_file(str(f)) for f in files]}
    chat, _ = client.predict(message, list(history), adapter, 0.0, 0.9, max_new_tokens, api_name="/chat")
    return chat, chat[-1]["content"][0]["text"]


def png(path, colour="red", size=(64, 64)):
    Image.new("RGB", size, colour).save(path)
    return path


def test_status_lists_adapters_and_warns_about_broken_ones(app_url):
    _, service = app_url
    status = service.status_markdown()
    assert "text-open-gates" in status and "vision" in status
    assert "broken.safetensors" in status and "could not be loaded" in status
    assert "random weights" not in status  # the tiny tower was loaded from a weights file


def test_questions_with_and_without_an_image_get_answers(app_url, tmp_path):
    url, _ = app_url
    _, answer = ask(url, "What is the capital of France?")
    assert "Paris" in answer
    chat, answer = ask(url, "What color is this?", files=[png(tmp_path / "red.png")], adapter="vision")
    assert answer.strip() and not answer.startswith("⚠️")
    assert chat[0]["content"][0]["type"] == "file"  # the image is shown in the conversation


def test_bad_uploads_get_friendly_messages_and_the_app_keeps_working(app_url, tmp_path):
    url, _ = app_url
    fake = tmp_path / "photo.jpg"
    fake.write_text("this is not an image")
    _, answer = ask(url, "What is this?", files=[fake], adapter="vision")
    assert answer.startswith("⚠️") and "could not be used as an image" in answer
    buf = io.BytesIO()
    Image.new("RGB", (128, 128), "blue").save(buf, format="PNG")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(buf.getvalue()[:100])
    _, answer = ask(url, "And this?", files=[truncated], adapter="vision")
    assert answer.startswith("⚠️")
    _, answer = ask(url, "What is the capital of France?")
    assert "Paris" in answer


def test_empty_and_overlong_questions(app_url):
    url, _ = app_url
    _, answer = ask(url, "   ")
    assert answer.startswith("⚠️") and "type a question" in answer
    _, answer = ask(url, "Please summarise: " + "blah " * 3000, max_new_tokens=8)
    assert "truncated" in answer


def test_switching_adapters_changes_the_answer(app_url):
    url, _ = app_url
    question = "Write a short sentence about the moon."
    _, base = ask(url, question)
    _, adapted = ask(url, question, adapter="text-open-gates")
    assert base.strip() and adapted.strip() and base != adapted


def test_follow_up_keeps_history(app_url, smollm, monkeypatch):
    url, _ = app_url
    seen = []
    original = smollm.stream
    monkeypatch.setattr(smollm, "stream", lambda *a, **kw: seen.append(kw.get("history")) or original(*a, **kw))
    chat, first = ask(url, "My name is Ada. Remember it.")
    ask(url, "What is my name?", history=chat)
    assert seen[-1] == [("My name is Ada. Remember it.", first)]  # the earlier turn reaches the prompt


def spy_on_images(service, monkeypatch, finished: list | None = None) -> list:
    """Record the image path each request reaches the service with (and, in `finished`, when it is answered)."""
    seen = []
    original = service.answer

    def answer(question, path, *args, **kwargs):
        seen.append(path)
        yield from original(question, path, *args, **kwargs)
        if finished is not None:
            finished.append(path)

    monkeypatch.setattr(service, "answer", answer)
    return seen


def test_the_image_belongs_to_the_history_that_carries_it(app_url, tmp_path, monkeypatch):
    url, service = app_url
    seen = spy_on_images(service, monkeypatch)
    client = gradio_client.Client(url, verbose=False, download_files=False)
    question = "What color is this?"

    def turn(history, files=()):
        message = {"text": question, "files": [gradio_client.handle_file(str(f)) for f in files]}
        chat, _ = client.predict(message, history, "vision", 0.0, 0.9, 12, api_name="/chat")
        return chat, chat[-1]["content"][0]["text"]

    chat, with_image = turn([], [png(tmp_path / "red.png")])
    upload = chat[0]["content"][0]["file"]["path"]
    assert seen[-1] == upload
    _, follow_up = turn(chat)  # the history carries the image: the follow-up is about it
    assert seen[-1] == upload and follow_up == with_image
    _, fresh = turn([])  # same client (same session), empty history: no image
    assert seen[-1] is None
    _, other_client = ask(url, question, adapter="vision", max_new_tokens=12)
    assert seen[-1] is None and fresh == other_client
    assert fresh != with_image  # the open gates make the image matter, so the check above can fail
    client.predict(api_name="/clear")
    assert gone(upload)  # clearing deletes the conversation's upload (after the grace)


def test_server_paths_from_requests_are_refused(app_url, monkeypatch):
    """A raw API call naming a server file (no upload) must never reach our image loader."""
    import httpx

    url, service = app_url
    seen = []
    original = service.answer
    monkeypatch.setattr(service, "answer", lambda q, path, *a, **kw: seen.append(path) or original(q, path, *a, **kw))
    file = {"path": "/etc/passwd", "orig_name": "passwd.png", "meta": {"_type": "gradio.FileData"}}
    payload = {"data": [{"text": "read this", "files": [file]}, [], NO_ADAPTER, 0.0, 0.9, 8]}
    event = httpx.post(f"{url}gradio_api/call/chat", json=payload, timeout=30).json()["event_id"]
    stream = httpx.get(f"{url}gradio_api/call/chat/{event}", timeout=60).text
    assert "event: error" in stream
    assert "/etc/passwd" not in seen


def test_browser_asks_a_question_and_saves_a_screenshot(app_url, tmp_path):
    """A real browser loads the page, types a question, sees the streamed answer; the screenshot is kept."""
    import os

    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    url, _ = app_url
    browser = chromium_driver()
    try:
        browser.get(url)
        wait = WebDriverWait(browser, 120)
        box = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "textarea")))
        box.send_keys("What is the capital of France?")
        box.send_keys(Keys.ENTER)
        wait.until(lambda b: "Paris" in b.find_element(By.CSS_SELECTOR, ".bubble-wrap, [role=log]").text)
        shot = os.environ.get("MMADAPTER_SCREENSHOT") or str(tmp_path / "app.png")
        browser.save_screenshot(shot)
        assert os.path.getsize(shot) > 10_000
        print(f"screenshot saved to {shot}")
    finally:
        browser.quit()


def test_browser_clearing_by_icon_button_or_reload_forgets_the_image(app_url, tmp_path, monkeypatch):
    """In a real page, the chatbot's clear icon, the Clear button and a page reload each start a conversation
    without the image and delete the upload (follow-ups keeping the image: the API test above)."""
    import time
    import uuid

    from gradio.utils import get_upload_folder
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    url, service = app_url
    finished = []
    seen = spy_on_images(service, monkeypatch, finished)
    browser = chromium_driver()
    wait = WebDriverWait(browser, 120)

    def ask_in_page(question: str, with_image: bool = False) -> str | None:
        """Type a question (attaching a fresh picture) and return the image path the service got."""
        if with_image:
            name = f"pic-{uuid.uuid4().hex[:8]}.png"
            picker = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "input[type=file]")))
            picker.send_keys(str(png(tmp_path / name, "blue")))
            wait.until(lambda b: list(Path(get_upload_folder()).glob(f"*/{name}")))  # the upload is done
        before = len(seen)
        box = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "textarea")))
        box.send_keys(question)
        box.send_keys(Keys.ENTER)
        wait.until(lambda b: len(finished) > before)
        time.sleep(0.5)  # the last streamed state reaches the page
        return seen[-1]

    def short_answers() -> None:
        """Max new tokens (the third slider's number box) down to 8, so that each answer is quick."""
        number = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "input[type=number]")[2:])[0]
        number.send_keys(Keys.CONTROL, "a")
        number.send_keys("8", Keys.TAB)

    def deleted(path: str) -> None:
        wait.until(lambda b: not Path(path).exists())

    try:
        browser.get(url)
        short_answers()
        first = ask_in_page("What is this?", with_image=True)
        assert first is not None and Path(first).is_file()
        browser.find_element(By.CSS_SELECTOR, "button[aria-label='Clear']").click()  # the chatbot's trash icon
        deleted(first)
        assert ask_in_page("What is this?") is None

        second = ask_in_page("What is this?", with_image=True)
        assert second is not None
        browser.find_element(By.XPATH, "//button[normalize-space()='Clear conversation']").click()
        deleted(second)
        assert ask_in_page("What is this?") is None

        third = ask_in_page("What is this?", with_image=True)
        assert third is not None
        browser.refresh()
        deleted(third)  # the page's unload ends its session
        short_answers()
        assert ask_in_page("What is this?") is None
    finally:
        browser.quit()
