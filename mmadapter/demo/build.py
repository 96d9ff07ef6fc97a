"""Rebuild the shipped demo from scratch, in stages that resume: tower -> probes -> data -> adapter -> curve -> eval.

    python -m mmadapter.demo.build --out runs/demo-build --ship      # `make demo-weights`
    python -m mmadapter.demo.build --out runs/demo-quick --quick     # minutes, to check the pipeline

Every stage records its settings in <out>/<stage>/stage.json when it finishes (stages.py): a rerun after a
kill reuses the finished stages and continues the adapter training from its last checkpoint; a rerun
with other settings is refused by name rather than mixing work made two ways. Outputs in --out:
tower/ (weights, tower_loss.png), probe/ (linear and question-conditioned probe tables), data/ (rendered
training images, train.json), adapter/ (the trainer's outputs and checkpoints), curve/ (accuracy per
question type against presentations, curve.png), eval/ (the test-set table with its ablations),
report.json. --ship copies the tower and the adapter into the package (mmadapter/demo/weights/), where
`mmadapter.load_demo()` and the app find them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_save, atomic_write_text
from .registry import ADAPTER_FILE, DEMO_TAG, TOWER_FILE, TOWER_NAME
from .stages import commit, run_stage, stage_seconds
from .tower import TowerTraining, train_tower


@dataclass
class Budget:
    """How much of everything, and the adapter's recipe."""

    tower: TowerTraining
    probe_train_scenes: int = 3000
    probe_test_scenes: int = 600
    probe_steps: int = 2000
    train_scenes: int = 2400
    questions_per_kind: int = 1  # per scene and question type
    chat_repeats: int = 16
    chat_prompts: int | None = None  # None: every prompt of chat_prompts.txt
    projector: str = "mlp"  # mlp (V1: one image token), spatial (one token per region, token k -> prompt k)
    spatial_grid: int | None = None  # spatial: None = one token per patch
    adapter_layers: int = 16
    adapter_prompts: int = 10  # mlp only: token projectors use their token count
    template: str = "chat"
    batch_size: int = 16
    lr: float = 5e-3
    epochs: int = 1
    save_every: int = 100
    curve_per_kind: int = 50  # questions per type scored at every checkpoint
    eval_per_kind: int = 600
    ablation_per_kind: int = 100
    extra: dict[str, Any] = field(default_factory=dict)


FULL = Budget(tower=TowerTraining(steps=450, batch_size=128, lr=1e-3, warmup_steps=20))
QUICK = Budget(tower=TowerTraining(steps=10, batch_size=32, lr=1e-3, warmup_steps=5), probe_train_scenes=40,
               probe_test_scenes=20, probe_steps=10, train_scenes=24, chat_repeats=1, chat_prompts=4, save_every=5,
               curve_per_kind=2, eval_per_kind=3, ablation_per_kind=2)


def build(out: Path, budget: Budget, progress: bool = True) -> dict[str, Any]:
    report: dict[str, Any] = {"budget": asdict(budget), "commit": commit()}
    tower_file = out / "tower" / f"{TOWER_NAME}.safetensors"
    report["tower"] = run_stage(out / "tower", "tower", asdict(budget.tower),
                                lambda: _tower_stage(out / "tower", tower_file, budget, progress))
    model = _model(tower_file, budget)
    tower_id = {"tower_weights": report["tower"]["weights_sha256"]}
    report["probe"] = run_stage(out / "probe", "probe", {**tower_id, "train_scenes": budget.probe_train_scenes,
                                                        "test_scenes": budget.probe_test_scenes,
                                                        "steps": budget.probe_steps},
                                lambda: _probe_stage(tower_file, out / "probe", budget, progress))
    report["data"] = run_stage(out / "data", "data", {k: getattr(budget, k) for k in
                                                      ("train_scenes", "questions_per_kind", "chat_repeats", "chat_prompts")},
                               lambda: _data_stage(model, out / "data", budget, progress))
    config = _train_config(out, budget, progress)
    adapter_settings = {**tower_id, "train": {k: v for k, v in config.to_dict().items() if k != "progress"},
                        "adapter": asdict(model.adapter.config), "vision": asdict(model.adapter.vision_config)}
    report["adapter"] = run_stage(out / "adapter", "adapter", adapter_settings,
                                  lambda: _adapter_stage(model, config))
    report["curve"] = run_stage(out / "curve", "curve", {**adapter_settings, "per_kind": budget.curve_per_kind},
                                lambda: _curve_stage(model, out, budget, progress))
    report["eval"] = run_stage(out / "eval", "eval", {**adapter_settings, "per_kind": budget.eval_per_kind,
                                                      "ablation_per_kind": budget.ablation_per_kind},
                               lambda: _eval_stage(model, out / "eval", budget, progress))
    report["stage_seconds"] = stage_seconds(out)
    atomic_write_text(out / "report.json", json.dumps(report, indent=1, default=str))
    _save_with_recipe(model, out / "adapter" / "adapter.safetensors", report)
    from .evaluate import format_table

    print(format_table(report["eval"]))
    print("What is the capital of France? ->", report["eval"]["capital_of_france"])
    print("stage times (s):", report["stage_seconds"])
    return report


def _tower_stage(folder: Path, tower_file: Path, budget: Budget, progress: bool) -> dict[str, Any]:
    import hashlib

    from ..plot import plot_loss_curve

    summary = train_tower(tower_file, budget.tower, progress)
    losses = summary.pop("losses")
    plot_loss_curve([{"type": "train", "step": i + 1, "loss": v} for i, v in enumerate(losses)],
                    folder / "tower_loss.png", f"{TOWER_NAME}: contrastive loss")
    summary["final_loss"] = losses[-1] if losses else None
    summary["weights_sha256"] = hashlib.sha256(tower_file.read_bytes()).hexdigest()
    return summary


def _model(tower_file: Path, budget: Budget) -> Any:
    """The embedded base with the built tower and a fresh adapter of the budget's recipe."""
    from ..config import VisionConfig
    from .recipe import demo_model

    vision = VisionConfig(model=TOWER_NAME, pretrained=str(tower_file), projector=budget.projector,
                          spatial_grid=budget.spatial_grid)
    torch.manual_seed(0)
    return demo_model(vision, budget.adapter_layers, budget.adapter_prompts, budget.template)


def _probe_stage(tower_file: Path, folder: Path, budget: Budget, progress: bool) -> dict[str, Any]:
    """What the tower can tell: linear probes on its global features and question-conditioned readers."""
    from ..config import VisionConfig
    from ..vision import VisionTower
    from .probe import probe_tower
    from .reader_probe import ProbeTraining, run_probe

    config = VisionConfig(model=TOWER_NAME, pretrained=str(tower_file))
    tower = VisionTower(config)
    with torch.no_grad():
        linear = probe_tower(lambda images: tower(tower.preprocess_batch(images)), budget.probe_train_scenes,
                             budget.probe_test_scenes)
    readers = run_probe(config, folder, budget.probe_train_scenes, budget.probe_test_scenes,
                        ProbeTraining(steps=budget.probe_steps), progress=progress)
    return {"linear": linear, "readers": readers["accuracy"], "reader_test_questions": readers["test_questions"]}


def _data_stage(model: Any, folder: Path, budget: Budget, progress: bool) -> dict[str, Any]:
    from .data import chat_prompts, image_qa_records, self_distilled_chat

    records = image_qa_records(folder, budget.train_scenes, per_kind=budget.questions_per_kind, progress=progress)
    chat = self_distilled_chat(model, chat_prompts()[:budget.chat_prompts], progress=progress)
    atomic_write_text(folder / "train.json", json.dumps(records + chat * budget.chat_repeats))
    return {"image_questions": len(records), "scenes": budget.train_scenes, "chat_prompts": len(chat),
            "chat_repeats": budget.chat_repeats}


def _train_config(out: Path, budget: Budget, progress: bool) -> Any:
    import mmadapter

    return mmadapter.TrainConfig(
        data=str(out / "data" / "train.json"), template=budget.template, epochs=budget.epochs,
        batch_size=budget.batch_size, lr=budget.lr, warmup_epochs=0.05 * budget.epochs, min_lr=budget.lr / 20,
        clip_grad=1.0, prefix_cache="memory", feature_cache_dir=str(out / "features"),
        output_dir=str(out / "adapter"), save_every=budget.save_every, keep_last=10**6, resume=True,
        progress=progress)


def _adapter_stage(model: Any, config: Any) -> dict[str, Any]:
    import mmadapter

    result = mmadapter.train(model, config.data, config)
    return {"final_loss": result.final_loss}


def _checkpoints(out: Path) -> list[tuple[int, Path]]:
    """(step, adapter file) of every checkpoint the adapter stage wrote, in order."""
    found = []
    for folder in sorted((out / "adapter" / "checkpoints").glob("step-*")):
        if (folder / "adapter.safetensors").is_file():
            found.append((int(folder.name.removeprefix("step-")), folder / "adapter.safetensors"))
    return found


def _curve_stage(model: Any, out: Path, budget: Budget, progress: bool) -> dict[str, Any]:
    """Accuracy per question type at every checkpoint: the learning curve."""
    from tqdm.auto import tqdm

    from ..adapter_file import load_adapter
    from ..data import shapes
    from ..plot import plot_accuracy_curves
    from .evaluate import blind_best, evaluate

    points = []
    for step, path in tqdm(_checkpoints(out), desc="learning curve", disable=not progress):
        load_adapter(model, path)
        accuracy = evaluate(model, budget.curve_per_kind, ablation_per_kind=0, progress=False)["accuracy"]
        points.append({"step": step, "presentations": step * budget.batch_size, "accuracy": accuracy})
    blind = blind_best(shapes.test_set(budget.curve_per_kind))
    plot_accuracy_curves(points, out / "curve" / "curve.png", "demo adapter: test accuracy per question type "
                         "(dotted: blind best)", chance=blind)
    return {"points": points, "blind_best": blind}


def _eval_stage(model: Any, folder: Path, budget: Budget, progress: bool) -> dict[str, Any]:
    from ..adapter_file import load_adapter
    from .evaluate import evaluate, format_table

    load_adapter(model, folder.parent / "adapter" / "adapter.safetensors")
    results = evaluate(model, budget.eval_per_kind, budget.ablation_per_kind, progress=progress, out=folder / "runs")
    results["capital_of_france"] = model.generate("What is the capital of France?", max_new_tokens=32)
    atomic_write_text(folder / "eval.md", format_table(results) + "\n")
    return results


def _save_with_recipe(model: Any, path: Path, report: dict[str, Any]) -> None:
    """The adapter with what actually ran in its metadata: tower summary, probes, data counts, the full
    training config, stage times, results and the commit."""
    from ..adapter_file import load_adapter, save_adapter

    load_adapter(model, path)
    recipe = {
        "made_by": "python -m mmadapter.demo.build (make demo-weights)",
        "commit": report["commit"],
        "tower": {"name": TOWER_NAME, "training": report["budget"]["tower"], "summary": report["tower"],
                  "how": "trained from scratch with open_clip's ClipLoss extended by hard-negative captions (one "
                         "binding changed) on generated shapes-world image-caption pairs"},
        "probe": report["probe"],
        "data": {**report["data"], "image_data": "generated shapes-world scenes (mmadapter.data.shapes, train "
                                                 "split), every question type per scene",
                 "text_data": "self-distillation: the frozen base's own greedy answers to "
                              "mmadapter/demo/chat_prompts.txt; no external instruction data"},
        "budget": report["budget"],
        "train_config": json.loads((path.parent / "config.json").read_text(encoding="utf-8"))
        if (path.parent / "config.json").is_file() else None,
        "eval": {k: report["eval"][k] for k in ("accuracy", "other_scene", "ablation", "blind_best", "per_kind",
                                                  "ablation_per_kind")},
        "stage_seconds": report["stage_seconds"],
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
    """`make demo-weights`: the full build (resumes in --out), optionally shipped."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo-build", help="working folder (default: runs/demo-build)")
    parser.add_argument("--quick", action="store_true", help="a tiny budget that checks the pipeline in minutes")
    parser.add_argument("--ship", action="store_true", help="copy the results into the package")
    parser.add_argument("--projector", choices=("mlp", "spatial"),
                        help="the adapter's image path (default: the budget's, mlp: one V1 image token)")
    parser.add_argument("--template", choices=("chat", "chat-short"), help="prompt template (default: the budget's)")
    parser.add_argument("--adapter-layers", type=int, help="adapted layers (default: the budget's)")
    parser.add_argument("--train-scenes", type=int, help="training scenes (default: the budget's)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    out = Path(args.out)
    t0 = time.time()
    overrides = {k: v for k in ("projector", "template", "adapter_layers", "train_scenes")
                 if (v := getattr(args, k)) is not None}
    build(out, dataclasses.replace(QUICK if args.quick else FULL, **overrides))
    print(f"build: {time.time() - t0:.0f} s in this run")
    if args.ship:
        ship(out)


if __name__ == "__main__":
    main()
