"""mmadapter: a multimodal LLaMA-Adapter over a frozen LLaMA-family model."""

from .adapter import Adapter
from .config import AdapterConfig, LlamaConfig, VisionConfig
from .model import MMAdapter, build_model, load_base
from .weights import CheckpointError

__all__ = ["Adapter", "AdapterConfig", "CheckpointError", "LlamaConfig", "MMAdapter", "VisionConfig",
           "build_model", "load_base"]
__version__ = "0.1.0"
