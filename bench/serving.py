"""The app under load: N gradio_client users, 3-turn chats, half of them about an image.

The same load runs against three servers started in turn, each a fresh `python -m app` process on
localhost: one-at-a-time decoding (`--max-batch 0`, two requests in flight, each with its own forward
passes: the app before continuous batching), continuous batching with whole prompts prefilled and nothing
reused (`--max-batch 8 --prefill-chunk 0 --reuse-mb 0`), and continuous batching with chunked prefill and
the K/V of earlier turns reused (`--max-batch 8`, the app's defaults). All get the same multimodal adapter
(random weights over ViT-B-32, so images cost a real tower pass). Reported per server: requests answered /
refused / failed, p50 and p95 latency, aggregate generated tokens/s with 1 user and with N users, the
server's peak RSS above its RSS after warm-up (VmHWM), and the time to the first streamed text: turn 1 and
turn N of the one user's chat, and its median over the N users' requests. For the batching servers, the
engine's profile of each load (fetched from the app's `engine_profile` endpoint before and after it;
mmadapter/batch_profile.py) goes into the result file under "profile", with a table of where the time went:
the engine's wall time split into idle, tower, admission, prefill, decoding steps and handing tokens out,
the mean step by rows decoding, and per request the mean seconds queued, in the tower, prefilling, held while
others' prompts were prefilled, decoding (its share of the steps) and to the first token (in the engine).

Timings on a shared machine are noisy: compare the servers of one run, not runs.
`python -m bench.serving [--users 8] [--turns 3] [--max-new-tokens 48]`; a quick check that it runs end to
end, writing nothing (8 tokens: the app's smallest):
`python -m bench.serving --users 2 --turns 2 --max-new-tokens 8 --servers reuse --no-write`
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

from .common import report, sections

SERVERS = {  # name in --servers: (row label, app options)
    "one": ("one at a time", ["--max-batch", "0"]),
    "batched": ("continuous batching", ["--max-batch", "8", "--prefill-chunk", "0", "--reuse-mb", "0"]),
    "reuse": ("batching + chunked prefill + reuse", ["--max-batch", "8"]),
}
QUESTIONS = ["What is in this picture?", "Tell me more about it.", "Summarise what you said in one line.",
             "Name a fruit and describe it.", "Why is the sky blue?", "Write a haiku about rain."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_adapter(folder: Path) -> None:
    """A multimodal adapter over the embedded base and a ViT-B-32 tower (random weights: no hub here).

    Its gates are opened only a little (0.05): at 0.3 a random adapter makes the base answer in non-words whose
    re-tokenised text differs from the generated ids after a few tokens, so a later turn, whose prompt carries the
    answer as text, could reuse almost none of its K/V; a trained adapter answers in words, as this one does. The
    work per token is the same whatever the gates hold."""
    import torch

    from mmadapter import AdapterConfig, VisionConfig, build_model
    from mmadapter.adapter_file import save_adapter

    model = build_model("smollm2-135m-instruct", AdapterConfig(), VisionConfig("ViT-B-32", pretrained=None), seed=0)
    with torch.no_grad():
        model.adapter.gates.fill_(0.05)
    save_adapter(model, folder / "vision.safetensors")


def start_server(adapters: Path, options: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "app", "--adapters-dir", str(adapters), "--port", str(port),
               "--max-prompt-tokens", "512", "--queue-size", "64", "--engine-profile", *options]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    for line in server.stdout:
        if "running at" in line:
            return server, line.split("running at ")[1].split()[0]
    raise RuntimeError(f"the app did not start (exit code {server.wait()})")


def engine_profile(url: str) -> dict:
    """The server's batch engine profile so far (`BatchEngine.stats`); {} when it decodes one request at a time."""
    import gradio_client

    return gradio_client.Client(url, verbose=False, download_files=False).predict(api_name="/engine_profile")


BREAKDOWN = ["server", "load", "engine wall s", "idle", "tower", "admission", "prefill", "decode steps",
             "token hand-out", "other", "steps", "rows per step (computed)", "ms per step, by rows decoding",
             "queued s", "tower s", "prefill s", "held for others' prefill s", "decode s (share)",
             "first token s (engine)", "prompt tokens prefilled / reused"]


def breakdown_row(label: str, load: str, profile: dict) -> list:
    """One row of the breakdown table: a load's profile (`batch_profile.difference` of two snapshots)."""
    from mmadapter.batch_profile import summary

    f = summary(profile)
    by_rows = ", ".join(f"{n}: {1000 * b['seconds'] / b['steps']:.0f}" for n, b in profile["by_rows"].items())
    return [label, load, round(f["wall s"], 1), *(f"{f[k + ' %']:.0f}%" for k in
                                                   ("idle", "tower", "admit", "prefill", "step", "emit", "other")),
            f["steps"], f"{f['rows per step']:.1f} ({f['rows computed per step']:.1f})", by_rows,
            *(round(f[f"mean {k}"], 3) for k in ("queued_s", "tower_s", "prefill_s", "waiting_prefill_s")),
            f"{f['mean decode_s']:.2f} ({f['mean decode_share_s']:.2f})", round(f["mean first_token_s"], 3),
            f"{f['prefilled tokens']} / {f['reused tokens']}"]


def rss_mib(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def assistant_text(messages: list) -> str:
    """The text of the last (assistant) message of a chat as gradio_client returns it ("" when none yet)."""
    if not messages or messages[-1].get("role") != "assistant":
        return ""
    content = messages[-1]["content"]
    if isinstance(content, list):
        content = next((c.get("text") for c in content if isinstance(c, dict) and c.get("text")), "")
    return content if isinstance(content, str) else ""


def run_users(url: str, users: int, turns: int, max_new_tokens: int, picture: Path, count_tokens,
              offset: int = 0) -> dict:
    """Every user runs one chat of `turns` turns; users with an even index send the picture first.
    User i's turn t asks QUESTIONS[i + t + offset]; the first streamed text of each turn is timed."""
    import gradio_client

    lock = threading.Lock()
    latencies, tokens, outcomes = [], [], {"answered": 0, "refused": 0, "errors": 0}
    first_token: dict[int, list[float]] = {t: [] for t in range(turns)}  # per turn, seconds
    failures: list[str] = []  # what a failed request said, printed with the table

    def user(index: int) -> None:
        client = gradio_client.Client(url, verbose=False, download_files=False)
        history: list = []
        for turn in range(turns):
            files = [gradio_client.handle_file(str(picture))] if index % 2 == 0 and turn == 0 else []
            message = {"text": QUESTIONS[(index + turn + offset) % len(QUESTIONS)], "files": files}
            start, first = time.monotonic(), None
            try:
                job = client.submit(message, history, "vision", 0.0, 0.9, max_new_tokens, api_name="/chat")
                for output in job:  # the streamed states of the answer
                    if first is None and assistant_text(output[0]).strip():
                        first = time.monotonic() - start
                history, _ = job.result()
            except Exception as e:  # noqa: BLE001 - every outcome is counted
                with lock:
                    refused = "queue is full" in str(e).lower()
                    outcomes["refused" if refused else "errors"] += 1
                    if not refused:
                        failures.append(f"{type(e).__name__}: {e}"[:300])
                return
            text = assistant_text(history)
            with lock:
                latencies.append(time.monotonic() - start)
                tokens.append(count_tokens(text))
                answered = bool(text.strip()) and not text.startswith("⚠️")
                outcomes["answered" if answered else "errors"] += 1
                if not answered:
                    failures.append(text[:300])
                first_token[turn].append(first if first is not None else latencies[-1])

    threads = [threading.Thread(target=user, args=(i,)) for i in range(users)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    if not latencies:
        raise RuntimeError(f"no request was answered: {failures[:3]}")
    return {**outcomes, "p50": statistics.median(latencies), "p95": p95(latencies),
            "tokens_per_s": sum(tokens) / elapsed, "failures": failures,
            "first_token": {t: statistics.median(v) for t, v in first_token.items() if v},
            "first_token_p50": statistics.median([x for v in first_token.values() for x in v])}


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1] if len(values) > 1 else values[0]


def run(users: int = 8, turns: int = 3, max_new_tokens: int = 48, servers: tuple[str, ...] = tuple(SERVERS),
        write: bool = True) -> str:
    from PIL import Image

    from mmadapter import load_base

    tokenizer = load_base("smollm2-135m-instruct").tokenizer

    def count_tokens(text: str) -> int:
        return len(tokenizer.encode(text, bos=False))

    from mmadapter.batch_profile import difference

    rows, figures, profiles, breakdown = [], {}, {}, []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_adapter(folder)
        picture, alone_picture = folder / "picture.png", folder / "alone.png"
        Image.new("RGB", (640, 480), "orange").save(picture)
        Image.new("RGB", (640, 480), "teal").save(alone_picture)  # the one user's chat shares nothing with the N
        for name in servers:
            label, options = SERVERS[name]
            server, url = start_server(folder, options)
            try:
                run_users(url, 2, 1, 8, picture, count_tokens, offset=3)  # warm-up: text and image paths
                baseline = rss_mib(server.pid, "VmRSS:")
                snapshots = [engine_profile(url)]
                one = run_users(url, 1, turns, max_new_tokens, alone_picture, count_tokens)
                snapshots.append(engine_profile(url))
                many = run_users(url, users, turns, max_new_tokens, picture, count_tokens)
                snapshots.append(engine_profile(url))
                peak = rss_mib(server.pid, "VmHWM:")
            finally:
                server.terminate()
                server.wait()
            figures[label] = many
            if snapshots[0]:  # a batch engine: what each load cost it
                loads = {"1 user": difference(*snapshots[:2]), f"{users} users": difference(*snapshots[1:])}
                profiles[label] = {**loads, "reuse": snapshots[-1]["reuse"]}
                breakdown += [breakdown_row(label, load, p) for load, p in loads.items()]
            for failure in many["failures"]:
                print(f"{label}: a request failed: {failure!r}")
            first, last = one["first_token"][0], one["first_token"][turns - 1]
            rows.append([label, f"{many['answered']}/{many['refused']}/{many['errors']}", round(many["p50"], 2),
                         round(many["p95"], 2), round(one["tokens_per_s"], 1), round(many["tokens_per_s"], 1),
                         f"{many['tokens_per_s'] / one['tokens_per_s']:.2f}x", round(baseline), f"+{peak - baseline:.0f}",
                         round(one["p95"], 2), f"{many['p95'] / one['p95']:.2f}x", round(first, 2), round(last, 2),
                         f"{last / first:.2f}x", round(many["first_token_p50"], 2)])
    single = figures.get(SERVERS["one"][0])
    for name in ("batched", "reuse"):
        other = figures.get(SERVERS[name][0])
        if single is not None and other is not None:
            rows.append([f"{'batched' if name == 'batched' else 'batched + reuse'} / one at a time", "",
                         f"{other['p50'] / single['p50']:.2f}x", f"{other['p95'] / single['p95']:.2f}x", "",
                         f"{other['tokens_per_s'] / single['tokens_per_s']:.2f}x"] + [""] * 9)
    load = f"{users} gradio_client users, {turns}-turn chats, half with an image, max_new_tokens {max_new_tokens}"
    title = f"The app under load: {load}"
    headers = ["server", f"{users} users: answered/refused/errors", "p50 s", "p95 s", "tokens/s, 1 user",
               f"tokens/s, {users} users", f"{users} vs 1 user", "RSS after warm-up MiB", "peak RSS above it MiB",
               "p95 s, 1 user", f"p95 {users} users vs 1", "first token s, turn 1 (1 user)",
               f"first token s, turn {turns} (1 user)", f"turn {turns} vs turn 1", f"first token p50 s, {users} users"]
    tables = [{"title": f"Where the batch engine's time went ({load}; per request: means)", "headers": BREAKDOWN,
               "rows": breakdown}] if breakdown else []
    if not write:
        markdown = sections(title, headers, rows, tables)
        print(markdown, flush=True)
        return markdown
    return report("serving", title, headers, rows, extra={"profile": profiles}, tables=tables)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__)
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--servers", default=",".join(SERVERS),
                        help=f"which servers to run, comma-separated (default: all of {', '.join(SERVERS)})")
    parser.add_argument("--no-write", action="store_true", help="print the table; leave bench/results alone")
    args = parser.parse_args()
    chosen = tuple(args.servers.split(","))
    if unknown := set(chosen) - set(SERVERS):
        parser.error(f"unknown server(s) {', '.join(sorted(unknown))}: choose from {', '.join(SERVERS)}")
    run(args.users, args.turns, args.max_new_tokens, chosen, write=not args.no_write)
