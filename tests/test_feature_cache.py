"""FeatureCache: the tower runs once per unique picture; memory LRU, disk persistence, threads."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mmadapter.config import VisionConfig  # noqa: E402
from mmadapter.feature_cache import FeatureCache  # noqa: E402
from mmadapter.images import load_image  # noqa: E402
from mmadapter.vision import VisionTower  # noqa: E402
from test_vision import TINY_VIT, register_tiny_models, save_reference  # noqa: E402  (tests/ is on sys.path)


class CountingTower:
    """Counts the images a real tower encodes, seen from outside the cache."""

    def __init__(self, tower: VisionTower) -> None:
        self.tower = tower
        self.encoded = 0
        self.batches: list[int] = []
        tower.register_forward_hook(self._count)

    def _count(self, _module, inputs, _output) -> None:
        self.encoded += inputs[0].shape[0]
        self.batches.append(inputs[0].shape[0])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    register_tiny_models(tmp_path_factory.mktemp("open_clip_configs"))
    path = tmp_path_factory.mktemp("ckpt") / "tiny_vit.safetensors"
    save_reference(TINY_VIT, path, seed=3)
    return path


@pytest.fixture
def tower(checkpoint: Path) -> VisionTower:
    return VisionTower(VisionConfig(model=TINY_VIT, pretrained=str(checkpoint), n_scales=2))


def pictures(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8) for i in range(n)]


def direct_features(tower: VisionTower, images: list) -> torch.Tensor:
    return tower(tower.preprocess_batch([load_image(image) for image in images]))


def test_tower_runs_once_per_unique_image_across_epochs(tower: VisionTower, tmp_path: Path) -> None:
    counter = CountingTower(tower)
    paths = []
    for i, array in enumerate(pictures(5)):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(array).save(paths[-1])
    cache = FeatureCache(max_items=100)
    for _epoch in range(2):
        for start in range(0, 5, 2):
            batch = paths[start:start + 2]
            features = cache.features(tower, batch)
            assert features.shape == (len(batch), tower.feature_dim)
            torch.testing.assert_close(features, direct_features(tower, batch))
    counter.encoded -= 10  # the direct_features reference calls above
    assert counter.encoded == 5 == cache.tower_calls
    assert (cache.misses, cache.hits) == (5, 5)
    assert len(cache) == 5


def test_same_picture_from_any_source_and_repeats_hit(tower: VisionTower, tmp_path: Path) -> None:
    counter = CountingTower(tower)
    array = pictures(1)[0]
    path = tmp_path / "p.png"
    Image.fromarray(array).save(path)
    cache = FeatureCache()
    first = cache.features(tower, [path])
    for source in (path.read_bytes(), Image.open(path), array, str(path)):
        torch.testing.assert_close(cache.features(tower, [source]), first)
    other = pictures(1, seed=1)[0]
    mixed = cache.features(tower, [array, other, array])  # a repeat within one call is encoded once
    assert counter.encoded == cache.tower_calls == 2
    assert counter.batches == [1, 1]
    torch.testing.assert_close(mixed[0], mixed[2])
    torch.testing.assert_close(mixed, direct_features(tower, [array, other, array]))
    assert cache.misses == 2 and cache.hits == 4 + 2  # 4 other sources, then the array twice


def test_batches_are_bounded_and_in_order(tower: VisionTower) -> None:
    counter = CountingTower(tower)
    images = pictures(7)
    features = FeatureCache().features(tower, images, batch_size=3)
    assert counter.batches == [3, 3, 1]
    torch.testing.assert_close(features, direct_features(tower, images))


def test_disk_cache_survives_a_new_instance(tower: VisionTower, tmp_path: Path, caplog) -> None:
    images = pictures(3)
    first = FeatureCache(disk_dir=tmp_path).features(tower, images)
    files = sorted(tmp_path.rglob("*"))
    stored = [f for f in files if f.suffix == ".safetensors"]
    assert len(stored) == 3 and not [f for f in files if f.suffix == ".tmp"]

    reopened = FeatureCache(max_items=0, disk_dir=tmp_path)  # nothing in memory: every hit is from disk
    torch.testing.assert_close(reopened.features(tower, images), first)
    assert reopened.tower_calls == 0 and reopened.disk_hits == 3 and len(reopened) == 0

    stored[0].write_bytes(b"not safetensors")  # a corrupt file is recomputed and rewritten
    again = FeatureCache(disk_dir=tmp_path)
    torch.testing.assert_close(again.features(tower, images), first)
    assert again.tower_calls == 1 and again.disk_hits == 2 and len(again) == 3  # disk hits kept in memory
    assert "ignoring unreadable cached features" in caplog.text
    assert stored[0].read_bytes() != b"not safetensors"  # rewritten


def test_other_tower_never_reads_these_features(tower: VisionTower, checkpoint: Path, tmp_path: Path) -> None:
    images = pictures(2)
    other_weights_path = tmp_path / "other.safetensors"
    save_reference(TINY_VIT, other_weights_path, seed=4)
    other_weights = VisionTower(VisionConfig(model=TINY_VIT, pretrained=str(other_weights_path), n_scales=2))
    four_scales = VisionTower(VisionConfig(model=TINY_VIT, pretrained=str(checkpoint), n_scales=4))
    for i, other in enumerate((other_weights, four_scales)):
        memory = FeatureCache()
        FeatureCache(disk_dir=tmp_path / f"cache{i}").features(tower, images)
        disk = FeatureCache(max_items=0, disk_dir=tmp_path / f"cache{i}")
        memory.features(tower, images)
        for cache in (memory, disk):
            torch.testing.assert_close(cache.features(other, images), direct_features(other, images))
        assert memory.tower_calls == 2 + 2 and disk.tower_calls == 2


def test_lru_bound_evicts_least_recently_used(tower: VisionTower) -> None:
    a, b, c = pictures(3)
    cache = FeatureCache(max_items=2)
    cache.features(tower, [a])
    cache.features(tower, [b])
    cache.features(tower, [a])  # a is now the most recently used
    cache.features(tower, [c])  # evicts b
    assert len(cache) == 2 and cache.tower_calls == 3
    cache.features(tower, [a])
    assert cache.tower_calls == 3
    cache.features(tower, [b])
    assert cache.tower_calls == 4 and len(cache) == 2
    with pytest.raises(ValueError, match="max_items"):
        FeatureCache(max_items=-1)


def test_concurrent_requests_share_work(tower: VisionTower) -> None:
    images = pictures(4)
    expected = direct_features(tower, images)
    cache = FeatureCache()
    results: list[torch.Tensor] = []
    errors: list[BaseException] = []

    def request() -> None:
        try:
            results.append(cache.features(tower, images))
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=request) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(results) == 4
    for result in results:
        torch.testing.assert_close(result, expected)
    assert cache.tower_calls == 4  # each picture encoded once, whichever thread got there first
    assert cache.hits + cache.misses == 16
