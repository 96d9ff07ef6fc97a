"""mmadapter: a multimodal LLaMA-Adapter over a frozen LLaMA-family model."""

from .adapter import Adapter
from .config import AdapterConfig, LlamaConfig, TrainConfig, VisionConfig
from .adapter_file import load_adapter, save_adapter
from .demo import load_demo
from .demo.registry import CONFIG_FILE as _DEMO_CONFIG, DEMO_TAG as _DEMO_TAG, TOWER_FILE as _DEMO_TOWER, \
    TOWER_NAME as _DEMO_NAME
from .model import MMAdapter, build_model, load_base
from .towers import PackagedTower, register_packaged_tower
from .train import train
from .weights import CheckpointError

# The demo's ShapesCLIP-64 is known by name wherever mmadapter is imported: VisionConfig(model="ShapesCLIP-64",
# pretrained="shapes-demo") reads the weights shipped in the package.
register_packaged_tower(PackagedTower(_DEMO_NAME, _DEMO_TAG, _DEMO_CONFIG, _DEMO_TOWER))

__all__ = ["Adapter", "AdapterConfig", "CheckpointError", "LlamaConfig", "MMAdapter", "TrainConfig", "VisionConfig",
           "build_model", "load_adapter", "load_base", "load_demo", "save_adapter", "train"]
__version__ = "0.1.0"
