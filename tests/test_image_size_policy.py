"""The image size policy: no picture that load_image accepts can make tower preprocessing allocate
more than 128 MiB + 4 x its decoded RGB size, whatever its shape; bombs are refused from the header.

Measured in a subprocess (peak RSS reset through /proc/self/clear_refs before each picture) under an
address-space limit, so a regression fails with MemoryError instead of taking the machine's memory.
The tower is a one-block ViT with open_clip's usual 224-pixel input, so the resize it would do is the
real one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmadapter.config import VisionConfig
from mmadapter.images import MAX_ASPECT_RATIO, fit_for_tower
from mmadapter.vision import VisionTower
from test_images import png_header_only

TOWER = "mmtest-vit-224"
TOWER_CONFIG = {"embed_dim": 16, "vision_cfg": {"image_size": 224, "layers": 1, "width": 32, "patch_size": 32,
                                                 "head_width": 16},
                "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 1, "layers": 1}}

# (width, height) of plain PNGs (a few hundred bytes each), then header-only bombs.
SHAPES = [(30000, 1), (1, 30000), (4000, 2), (2, 4000), (8000, 8000), (64000, 100)]
BOMBS = [(100_000, 100_000), (9_000, 8_000)]

SCRIPT = r"""
import io, json, logging, resource, sys
import open_clip
from PIL import Image
from mmadapter.config import VisionConfig
from mmadapter.images import ImageError, load_image
from mmadapter.vision import VisionTower

logging.disable(logging.WARNING)
config_dir, name, shapes, bombs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
open_clip.add_model_config(config_dir)
tower = VisionTower(VisionConfig(model=name, pretrained=None, n_scales=1))

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024  # MiB

pictures = []
for width, height in shapes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 90)).save(buffer, "PNG")
    pictures.append((width, height, buffer.getvalue()))
pictures += [(width, height, path) for width, height, path in bombs]
limit = int((status("VmSize:") + 2048) * 2**20)  # 2 GiB above what the process has mapped now
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
for width, height, data in pictures:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    baseline = status("VmRSS:")
    try:
        outcome = list(tower.preprocess(load_image(data)).shape)
    except ImageError as e:
        outcome = "ImageError: " + str(e)
    except MemoryError:
        outcome = "MemoryError"
    print(json.dumps({"size": [width, height], "outcome": outcome,
                      "peak_mib": status("VmHWM:") - baseline}), flush=True)
"""


@pytest.fixture(scope="module")
def tower_config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("open_clip_224")
    (directory / f"{TOWER}.json").write_text(json.dumps(TOWER_CONFIG))
    import open_clip

    open_clip.add_model_config(directory)
    return directory


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to measure peak memory")
def test_every_shape_preprocesses_within_the_memory_bound(tower_config_dir: Path, tmp_path: Path) -> None:
    bombs = []
    for width, height in BOMBS:
        path = tmp_path / f"bomb_{width}x{height}.png"
        path.write_bytes(png_header_only(width, height))
        bombs.append((width, height, str(path)))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tower_config_dir), TOWER, json.dumps(SHAPES), json.dumps(bombs)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [tuple(row["size"]) for row in rows] == SHAPES + BOMBS
    for row in rows:
        width, height = row["size"]
        decoded_mib = width * height * 3 / 2**20
        if (width, height) in BOMBS:
            assert row["outcome"].startswith(f"ImageError: {tmp_path / f'bomb_{width}x{height}.png'}:"), row
            assert "decompression bomb" in row["outcome"] or "exceeds the limit" in row["outcome"], row
            assert row["peak_mib"] <= 128, row
        else:
            assert row["outcome"] == [3, 224, 224], row
            assert row["peak_mib"] <= 128 + 4 * decoded_mib, row


def test_the_crop_keeps_what_the_tower_sees(tower_config_dir: Path) -> None:
    tower = VisionTower(VisionConfig(model=TOWER, pretrained=None, n_scales=1))
    rng = np.random.default_rng(0)
    # Up to MAX_ASPECT_RATIO nothing changes: exactly open_clip's transform.
    panorama = Image.fromarray(rng.integers(0, 256, (100, 100 * MAX_ASPECT_RATIO, 3), dtype=np.uint8))
    assert fit_for_tower(panorama) is panorama
    torch.testing.assert_close(tower.preprocess(panorama), tower.transform(panorama), rtol=0, atol=0)
    # Beyond it the centre square survives the crop; only the resampling grid may move by under a pixel.
    for height, width in [(90, 1000), (1000, 90), (7, 3000)]:
        smooth = np.linspace(0, 255, max(height, width))  # a ramp along the long side, varying across the crop
        ramp = np.broadcast_to(smooth[:, None] if height > width else smooth[None, :], (height, width))
        picture = Image.fromarray(np.repeat(ramp[..., None], 3, axis=2).astype(np.uint8))
        cropped = fit_for_tower(picture)
        assert max(cropped.size) == MAX_ASPECT_RATIO * min(picture.size)
        torch.testing.assert_close(tower.preprocess(picture), tower.transform(picture), rtol=0, atol=0.05)
    # Other resize modes scale the long side down themselves: left alone.
    assert fit_for_tower(picture, "longest") is picture and fit_for_tower(picture, "squash") is picture
