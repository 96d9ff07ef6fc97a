"""The learning curves of several experiments in one PNG: held-out accuracy against presentations, one line
per experiment and question type, so settings are compared at a glance.

    python -m mmadapter.demo.experiment_plot bench/results/demo_experiments docs/demo_learning_curves.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..plot import plot_accuracy_curves


def curve_points(curves: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Points [{"presentations", "accuracy": {"<experiment> (<kind>)": percent}}] of every curve."""
    points = []
    for name, curve in sorted(curves.items()):
        for p in curve["points"]:
            points.append({"presentations": p["presentations"],
                           "accuracy": {f"{name} ({kind})": value for kind, value in p["accuracy"].items()}})
    return points


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="a folder of experiment curve files (<name>.json)")
    parser.add_argument("png")
    args = parser.parse_args(argv)
    files = sorted(Path(args.folder).glob("*.json"))
    if not files:
        parser.error(f"no curve files (*.json) in {args.folder}")
    curves = {f.stem: json.loads(f.read_text(encoding="utf-8")) for f in files}
    plot_accuracy_curves(curve_points(curves), args.png, "demo adapter experiments: held-out accuracy")
    print(args.png)


if __name__ == "__main__":
    main()
