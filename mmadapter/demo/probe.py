"""Linear probes on the frozen tower: what one global feature vector can carry about a scene.

The adapter sees an image only through the tower's multi-scale global features, so a linear
classifier's accuracy on them bounds (roughly) what the adapter can read. Attributes probed, each a
multinomial logistic regression on standardised features, trained on "val" scenes and scored on
"test" scenes:
  colour present (6 binary tasks), shape of the object of each colour, left/right and top/bottom of
  each colour (away from the middle line), number of objects.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..data import shapes


TRAIN_SPLIT, TEST_SPLIT = "val", "test"  # probes never train on the adapter's "train" scenes
IMAGE_SIZE = 64  # scenes are rendered at the demo tower's input side


def featurise_scenes(featurise: Callable[[list], torch.Tensor], scenes: list[shapes.Scene], batch_size: int = 256
                     ) -> torch.Tensor:
    """`featurise(PIL images) -> [B, F]` over scenes rendered at IMAGE_SIZE, in batches -> [N, F] float32."""
    return torch.cat([featurise([shapes.render(s, IMAGE_SIZE) for s in scenes[i:i + batch_size]]).float()
                      for i in range(0, len(scenes), batch_size)])


def scene_targets(scene: shapes.Scene) -> dict[str, int]:
    """Label per probe task; -1 where the task does not apply to this scene."""
    out: dict[str, int] = {"count": len(scene.objects) - 1}
    present = {o.color: o for o in scene.objects}
    for color in shapes.COLORS:
        o = present.get(color)
        out[f"present/{color}"] = int(o is not None)
        out[f"shape/{color}"] = -1 if o is None else shapes.SHAPES.index(o.shape)
        far_x = o is not None and abs(o.x - 0.5) >= shapes.POSITION_MARGIN
        far_y = o is not None and abs(o.y - 0.5) >= shapes.POSITION_MARGIN
        out[f"left-right/{color}"] = int(o.x >= 0.5) if far_x else -1
        out[f"top-bottom/{color}"] = int(o.y >= 0.5) if far_y else -1
    return out


def fit_probe(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
              steps: int = 300) -> float:
    """Test accuracy of a multinomial logistic regression ([N, F] features, [N] labels)."""
    n_classes = int(max(y_train.max(), y_test.max())) + 1
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    a, b = (x_train - mean) / std, (x_test - mean) / std
    layer = torch.nn.Linear(a.shape[1], n_classes)
    optimizer = torch.optim.LBFGS(layer.parameters(), lr=0.5, max_iter=steps, history_size=20)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(layer(a), y_train) + 1e-3 * layer.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return float((layer(b).argmax(-1) == y_test).float().mean())


def probe_tower(featurise: Callable[[list], torch.Tensor], n_train: int = 3000, n_test: int = 1000) -> dict[str, float]:
    """Probe accuracy per attribute group (averaged over colours), from `featurise(PIL images) -> [N, F]`."""
    data = {}
    for split, n in ((TRAIN_SPLIT, n_train), (TEST_SPLIT, n_test)):
        scenes = [shapes.make_scene(split, i) for i in range(n)]
        data[split] = (featurise_scenes(featurise, scenes), [scene_targets(s) for s in scenes])
    results: dict[str, list[float]] = {}
    for task in data[TRAIN_SPLIT][1][0]:
        sets = []
        for split in (TRAIN_SPLIT, TEST_SPLIT):
            feats, targets = data[split]
            labels = torch.tensor([t[task] for t in targets])
            keep = labels >= 0
            sets += [feats[keep], labels[keep]]
        group = task.split("/")[0]
        results.setdefault(group, []).append(fit_probe(*sets))
    return {group: round(100 * float(np.mean(accs)), 1) for group, accs in results.items()}
