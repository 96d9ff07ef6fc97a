"""Rebuild the shipped demo from scratch: generate -> train the CLIP tower -> train the adapter -> evaluate.

    python -m mmadapter.demo.build --out runs/demo-build --ship      # `make demo-weights`
    python -m mmadapter.demo.build --out runs/demo-quick --quick     # minutes, to check the pipeline

Outputs in --out: tower/ (weights, tower_loss.png, probe.json: linear-probe accuracy per attribute),
data/ (rendered training images and train.json), adapter/ (the trainer's outputs: adapter,
train_log.jsonl, loss_curve.png), eval.json and eval.md. --ship copies the tower and the adapter into
the package (mmadapter/demo/weights/), where `mmadapter.load_demo()` and the app find them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_save, atomic_write_text
from .registry import ADAPTER_FILE, DEMO_TAG, TOWER_FILE, TOWER_NAME
from .tower import TowerTraining, train_tower


@dataclass
class Budget:
    """How much of everything; the defaults fit the 60-minute target on a 2-core CPU."""

    tower: TowerTraining
    train_scenes: int = 2400
    chat_repeats: int = 16
    adapter_layers: int = 16
    adapter_prompts: int = 10
    batch_size: int = 16
    lr: float = 5e-3
    epochs: int = 1
    eval_per_kind: int = 600
    ablation_per_kind: int = 100


FULL = Budget(tower=TowerTraining(steps=450, batch_size=128, lr=1e-3, warmup_steps=20))
QUICK = Budget(tower=TowerTraining(steps=20, batch_size=64, lr=1e-3, warmup_steps=5), train_scenes=60,
               chat_repeats=1, eval_per_kind=10, ablation_per_kind=10)


def build(out: Path, budget: Budget, progress: bool = True) -> dict[str, Any]:
    import mmadapter
    from ..plot import plot_loss_curve
    from .data import chat_prompts, image_qa_records, self_distilled_chat
    from .evaluate import evaluate, format_table
    from .probe import probe_tower

    t0 = time.time()
    report: dict[str, Any] = {"budget": asdict(budget)}
    tower_file, tower_summary = out / "tower" / f"{TOWER_NAME}.safetensors", out / "tower" / "summary.json"
    if tower_file.is_file() and tower_summary.is_file():  # a rerun after a later stage failed
        tower = json.loads(tower_summary.read_text(encoding="utf-8"))
        print(f"reusing the tower trained earlier: {tower_file}")
    else:
        tower = train_tower(tower_file, budget.tower, progress)
        atomic_write_text(tower_summary, json.dumps(tower))
    plot_loss_curve([{"type": "train", "step": i + 1, "loss": v} for i, v in enumerate(tower.pop("losses"))],
                    out / "tower" / "tower_loss.png", f"{TOWER_NAME}: contrastive loss")
    report["tower"] = tower

    model = mmadapter.build_model(
        "smollm2-135m-instruct", mmadapter.AdapterConfig(n_prompts=budget.adapter_prompts, n_layers=budget.adapter_layers),
        mmadapter.VisionConfig(model=TOWER_NAME, pretrained=str(tower_file)), seed=0)
    probe = probe_tower(lambda images: model.vision(model.vision.preprocess_batch(images)))
    atomic_write_text(out / "tower" / "probe.json", json.dumps(probe, indent=1))
    report["probe"] = probe
    print(f"tower linear-probe accuracy (%): {probe}")

    records = image_qa_records(out / "data", budget.train_scenes, progress=progress)
    chat = self_distilled_chat(model, chat_prompts(), progress=progress)
    records += chat * budget.chat_repeats
    atomic_write_text(out / "data" / "train.json", json.dumps(records))
    report["data"] = {"image_questions": len(records) - len(chat) * budget.chat_repeats,
                      "scenes": budget.train_scenes, "chat_prompts": len(chat), "chat_repeats": budget.chat_repeats}

    config = mmadapter.TrainConfig(
        data=str(out / "data" / "train.json"), template="chat", epochs=budget.epochs, batch_size=budget.batch_size,
        lr=budget.lr, warmup_epochs=0.05 * budget.epochs, min_lr=budget.lr / 20, clip_grad=1.0,
        prefix_cache="memory", output_dir=str(out / "adapter"), save_every=100, progress=progress)
    result = mmadapter.train(model, config.data, config)
    report["adapter"] = {"final_loss": result.final_loss}
    report["seconds"] = round(time.time() - t0, 1)
    _save_with_recipe(model, out / "adapter" / "adapter.safetensors", report)  # again with the results below

    results = evaluate(model, budget.eval_per_kind, budget.ablation_per_kind, progress=progress)
    results["capital_of_france"] = model.generate("What is the capital of France?", max_new_tokens=32)
    report["eval"] = results
    table = format_table(results)
    print(table)
    print("What is the capital of France? ->", results["capital_of_france"])
    report["seconds"] = round(time.time() - t0, 1)
    atomic_write_text(out / "eval.md", table + "\n")
    atomic_write_text(out / "report.json", json.dumps(report, indent=1, default=str))
    _save_with_recipe(model, out / "adapter" / "adapter.safetensors", report)
    return report


def _save_with_recipe(model: Any, path: Path, report: dict[str, Any]) -> None:
    """The adapter with how it was made (data, budgets, probe, results) in its metadata."""
    from ..adapter_file import save_adapter

    recipe = {
        "made_by": "python -m mmadapter.demo.build (make demo-weights)",
        "tower": f"{TOWER_NAME} trained from scratch with open_clip's ClipLoss, extended by hard-negative captions "
                 "(one binding changed), on generated shapes-world image-caption pairs (colour, shape and coarse "
                 "position of every object)",
        "image_data": "generated shapes-world scenes (mmadapter.data.shapes, train split), one question per type",
        "text_data": "self-distillation: the frozen base's own greedy answers to mmadapter/demo/chat_prompts.txt; "
                     "no external instruction data",
        "budget": report["budget"], "probe": report["probe"],
        "eval": {k: report["eval"][k] for k in ("accuracy", "ablation", "blind_best", "per_kind", "ablation_per_kind")}
        if "eval" in report else None,
        "seconds": report["seconds"],
    }
    save_adapter(model, path, training=recipe)


def ship(out: Path) -> None:
    """Copy the built tower and adapter into the package (atomically).

    The adapter's metadata names its tower by the package tag instead of the build folder, so the
    shipped adapter finds the shipped tower wherever mmadapter is installed.
    """
    from safetensors.torch import save_file

    from ..adapter_file import METADATA_KEY, read_adapter

    TOWER_FILE.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(TOWER_FILE, lambda tmp: shutil.copyfile(out / "tower" / TOWER_FILE.name, tmp))
    meta, tensors = read_adapter(out / "adapter" / "adapter.safetensors")
    meta.vision = dataclasses.replace(meta.vision, pretrained=DEMO_TAG)
    atomic_save(ADAPTER_FILE, lambda tmp: save_file(tensors, tmp, metadata={METADATA_KEY: meta.to_json()}))
    for target in (TOWER_FILE, ADAPTER_FILE):
        print(f"shipped {target} ({target.stat().st_size / 2**20:.1f} MB)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo-build", help="working folder (default: runs/demo-build)")
    parser.add_argument("--quick", action="store_true", help="a tiny budget that checks the pipeline in minutes")
    parser.add_argument("--ship", action="store_true", help="copy the results into the package")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    out = Path(args.out)
    build(out, QUICK if args.quick else FULL)
    if args.ship:
        ship(out)


if __name__ == "__main__":
    main()
