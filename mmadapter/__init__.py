"""mmadapter: a multimodal LLaMA-Adapter over a frozen LLaMA-family model."""

from .adapter import Adapter
from .config import AdapterConfig, LlamaConfig, TrainConfig, VisionConfig
from .adapter_file import load_adapter, save_adapter
from .demo import load_demo
from .model import MMAdapter, build_model, load_base
from .train import train
from .weights import CheckpointError

__all__ = ["Adapter", "AdapterConfig", "CheckpointError", "LlamaConfig", "MMAdapter", "TrainConfig", "VisionConfig",
           "build_model", "load_adapter", "load_base", "load_demo", "save_adapter", "train"]
__version__ = "0.1.0"
