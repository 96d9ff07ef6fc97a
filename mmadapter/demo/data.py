"""Training records for the demo adapter: shapes-world questions with images, plus self-distilled chat.

No instruction dataset is available offline, so plain chat is kept alive by self-distillation: the
frozen base answers a fixed list of everyday prompts (`chat_prompts.txt`, greedy, its own chat
template) and those answers become text-only training targets. They teach the adapter to leave
text-only answers as the base gives them; they add no knowledge. "What is the capital of France?"
is deliberately not among them, so answering it after training is a fair check.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from ..data import shapes

if TYPE_CHECKING:
    from ..model import MMAdapter

CHAT_PROMPTS_FILE = Path(__file__).with_name("chat_prompts.txt")


def image_qa_records(image_dir: Path, n_scenes: int, split: str = "train", per_kind: int = 1,
                     progress: bool = True) -> list[dict[str, Any]]:
    """Render scenes 0..n_scenes-1 of a split as PNGs (varied size, noise, JPEG) with up to `per_kind`
    questions of each kind."""
    image_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for index in tqdm(range(n_scenes), desc=f"{split} scenes", disable=not progress):
        scene = shapes.make_scene(split, index)
        rng = np.random.default_rng([shapes.SPLIT_SEEDS[split], index, 7])
        name = f"{split}-{index:06d}.png"
        path = image_dir / name
        if not path.is_file():
            shapes.render_varied(scene, rng).save(path)
        for number, qa in enumerate(shapes.pick_questions(scene, rng, per_kind=per_kind)):
            records.append({"id": f"{split}-{index}-{qa.kind}-{number}", "question": qa.question, "answer": qa.answer,
                            "image": name, "kind": qa.kind})
    return records


def chat_prompts() -> list[str]:
    lines = CHAT_PROMPTS_FILE.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def self_distilled_chat(model: MMAdapter, prompts: list[str], max_new_tokens: int = 48,
                        batch_size: int = 28, progress: bool = True) -> list[dict[str, Any]]:
    """The frozen base's own greedy answers (no adapter) as text-only records; unfinished answers are dropped."""
    records = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="self-distilled chat", disable=not progress):
        batch = prompts[start:start + batch_size]
        answers = model.generate(batch, max_new_tokens=max_new_tokens, adapter=None, template="chat")
        for prompt, answer in zip(batch, answers):
            finished = len(model.tokenizer.encode(answer, bos=False)) < max_new_tokens - 1
            if finished and answer.strip():
                records.append({"id": f"chat-{start}", "question": prompt, "answer": answer.strip(), "kind": "chat"})
    return records
