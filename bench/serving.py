"""The app under load: N gradio_client users, 3-turn chats, half of them about an image.

The same load runs against two servers started in turn, each a fresh `python -m app` process on
localhost: one-at-a-time decoding (`--max-batch 0`, two requests in flight, each with its own forward
passes: the app before continuous batching) and continuous batching (`--max-batch 8`). Both get the
same multimodal adapter (random weights over ViT-B-32, so images cost a real tower pass). Reported per
server: requests answered / refused / failed, p50 and p95 latency, aggregate generated tokens/s with
1 user and with N users, and the server's peak RSS above its RSS after warm-up (VmHWM).

Timings on a shared machine are noisy: compare the two servers of one run, not runs.
`python -m bench.serving [--users 8] [--turns 3] [--max-new-tokens 48]`
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from .common import report

QUESTIONS = ["What is in this picture?", "Tell me more about it.", "Summarise what you said in one line.",
             "Name a fruit and describe it.", "Why is the sky blue?", "Write a haiku about rain."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_adapter(folder: Path) -> None:
    """A multimodal adapter over the embedded base and a ViT-B-32 tower (random weights: no hub here)."""
    import torch

    from mmadapter import AdapterConfig, VisionConfig, build_model
    from mmadapter.adapter_file import save_adapter

    model = build_model("smollm2-135m-instruct", AdapterConfig(), VisionConfig("ViT-B-32", pretrained=None), seed=0)
    with torch.no_grad():
        model.adapter.gates.fill_(0.3)
    save_adapter(model, folder / "vision.safetensors")


def start_server(adapters: Path, max_batch: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "app", "--adapters-dir", str(adapters), "--port", str(port),
               "--max-batch", str(max_batch), "--max-prompt-tokens", "512", "--queue-size", "64"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    for line in server.stdout:
        if "running at" in line:
            return server, line.split("running at ")[1].split()[0]
    raise RuntimeError(f"the app did not start (exit code {server.wait()})")


def rss_mib(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def run_users(url: str, users: int, turns: int, max_new_tokens: int, picture: Path, count_tokens) -> dict:
    """Every user runs one chat of `turns` turns; users with an even index send the picture first."""
    import gradio_client

    lock = threading.Lock()
    latencies, tokens, outcomes = [], [], {"answered": 0, "refused": 0, "errors": 0}
    failures: list[str] = []  # what a failed request said, printed with the table

    def user(index: int) -> None:
        client = gradio_client.Client(url, verbose=False, download_files=False)
        history: list = []
        for turn in range(turns):
            files = [gradio_client.handle_file(str(picture))] if index % 2 == 0 and turn == 0 else []
            message = {"text": QUESTIONS[(index + turn) % len(QUESTIONS)], "files": files}
            start = time.monotonic()
            try:
                history, _ = client.predict(message, history, "vision", 0.0, 0.9, max_new_tokens, api_name="/chat")
            except Exception as e:  # noqa: BLE001 - every outcome is counted
                with lock:
                    refused = "queue is full" in str(e).lower()
                    outcomes["refused" if refused else "errors"] += 1
                    if not refused:
                        failures.append(f"{type(e).__name__}: {e}"[:300])
                return
            text = history[-1]["content"][0]["text"]
            with lock:
                latencies.append(time.monotonic() - start)
                tokens.append(count_tokens(text))
                answered = bool(text.strip()) and not text.startswith("⚠️")
                outcomes["answered" if answered else "errors"] += 1
                if not answered:
                    failures.append(text[:300])

    threads = [threading.Thread(target=user, args=(i,)) for i in range(users)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    p95 = statistics.quantiles(latencies, n=20)[-1] if len(latencies) > 1 else latencies[0]
    return {**outcomes, "p50": statistics.median(latencies), "p95": p95, "tokens_per_s": sum(tokens) / elapsed,
            "failures": failures}


def run(users: int = 8, turns: int = 3, max_new_tokens: int = 48) -> str:
    from PIL import Image

    from mmadapter import load_base

    tokenizer = load_base("smollm2-135m-instruct").tokenizer

    def count_tokens(text: str) -> int:
        return len(tokenizer.encode(text, bos=False))

    rows, figures = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_adapter(folder)
        picture = folder / "picture.png"
        Image.new("RGB", (640, 480), "orange").save(picture)
        for label, max_batch in (("one at a time", 0), ("continuous batching", 8)):
            server, url = start_server(folder, max_batch)
            try:
                run_users(url, 2, 1, 8, picture, count_tokens)  # warm-up: text and image paths
                baseline = rss_mib(server.pid, "VmRSS:")
                one = run_users(url, 1, turns, max_new_tokens, picture, count_tokens)
                many = run_users(url, users, turns, max_new_tokens, picture, count_tokens)
                peak = rss_mib(server.pid, "VmHWM:")
            finally:
                server.terminate()
                server.wait()
            figures[label] = many
            for failure in many["failures"]:
                print(f"{label}: a request failed: {failure!r}")
            rows.append([label, f"{many['answered']}/{many['refused']}/{many['errors']}", round(many["p50"], 2),
                         round(many["p95"], 2), round(one["tokens_per_s"], 1), round(many["tokens_per_s"], 1),
                         f"{many['tokens_per_s'] / one['tokens_per_s']:.2f}x", round(baseline), f"+{peak - baseline:.0f}"])
    single, batched = figures["one at a time"], figures["continuous batching"]
    rows.append(["batched / one at a time", "", f"{batched['p50'] / single['p50']:.2f}x",
                 f"{batched['p95'] / single['p95']:.2f}x", "", f"{batched['tokens_per_s'] / single['tokens_per_s']:.2f}x",
                 "", "", ""])
    return report(
        "serving", f"The app under load: {users} gradio_client users, {turns}-turn chats, half with an image, "
                   f"max_new_tokens {max_new_tokens}",
        ["server", f"{users} users: answered/refused/errors", "p50 s", "p95 s", "tokens/s, 1 user",
         f"tokens/s, {users} users", f"{users} vs 1 user", "RSS after warm-up MiB", "peak RSS above it MiB"], rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__)
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()
    run(args.users, args.turns, args.max_new_tokens)
