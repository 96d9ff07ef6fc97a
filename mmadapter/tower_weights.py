"""Where a tower's weights come from: an open_clip tag, a local checkpoint file, a packaged tower's
file, or none (random). Tags are checked against the local caches, and the hub probed briefly, so an
offline machine fails in seconds with a message saying what to pass instead of retrying downloads."""

from __future__ import annotations

import logging
import os
import socket
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .config import RANDOM_WEIGHTS, SELF_CONTAINED_TOWERS
from .towers import packaged_tower

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
HUB_PROBE_TIMEOUT_S = 3.0


class VisionWeightsError(RuntimeError):
    """The tower's weights cannot be found or loaded; the message says what to pass instead."""



def resolve_pretrained(open_clip: Any, model_name: str, pretrained: str | None) -> tuple[str | None, bool]:
    """Return (what to pass as open_clip's `pretrained`, whether to force QuickGELU).

    Tags are checked against the local caches first so that an offline machine fails in seconds
    with a useful message instead of retrying downloads.
    """
    if model_name.startswith(SELF_CONTAINED_TOWERS):
        if pretrained is not None:
            log.info("pretrained=%r is ignored: %s carries its own weights", pretrained, model_name)
        return None, False
    if pretrained is None:
        log.warning(
            "VISION TOWER %s HAS RANDOM WEIGHTS (pretrained=None): answers about images will be meaningless. "
            "Pass an open_clip tag (e.g. %s:openai) or a local checkpoint file (%s:/path/to/weights.safetensors).",
            model_name, model_name, model_name,
        )
        return None, False
    packaged = packaged_tower(model_name)
    if packaged is not None and pretrained == packaged.tag:  # a tower shipped inside a package
        pretrained = str(packaged.weights_file)
    path = Path(pretrained).expanduser()
    if path.is_file() or path.suffix in CHECKPOINT_SUFFIXES or os.sep in pretrained or "/" in pretrained:
        if not path.is_file():
            raise VisionWeightsError(f"the {model_name} tower's weights file {pretrained} does not exist")
        if path.suffix not in CHECKPOINT_SUFFIXES:
            raise VisionWeightsError(
                f"{pretrained}: unsupported checkpoint type {path.suffix!r}; "
                f"use one of {', '.join(CHECKPOINT_SUFFIXES)}"
            )
        return str(path), False  # OpenAI weights need a '-quickgelu' model name, e.g. ViT-L-14-quickgelu
    tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not tag_cfg:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise VisionWeightsError(
            f"{pretrained!r} is neither a checkpoint file nor an open_clip tag for {model_name} "
            f"(known tags: {', '.join(tags) or 'none'}); use {model_name}:{RANDOM_WEIGHTS} for random weights"
        )
    require_tag_weights(model_name, pretrained, tag_cfg)
    return pretrained, bool(tag_cfg.get("quick_gelu", False))


def require_tag_weights(model_name: str, tag: str, tag_cfg: dict[str, Any]) -> None:
    """Raise VisionWeightsError if the tag's weights are not cached and cannot be downloaded now."""
    from open_clip.pretrained import has_hf_hub

    if "file" in tag_cfg:
        return
    if has_hf_hub() and tag_cfg.get("hf_hub"):
        from huggingface_hub import constants, try_to_load_from_cache
        from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

        repo_id, filename = os.path.split(tag_cfg["hf_hub"])
        candidates = [filename] if filename else [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]
        if filename.endswith((".bin", ".pth")):
            candidates.insert(0, filename[:-4] + ".safetensors")
        if any(isinstance(try_to_load_from_cache(repo_id, name), str) for name in candidates):
            return
        source, host = f"hf-hub:{repo_id}/{candidates[-1]}", urlparse(constants.ENDPOINT).hostname
    else:
        url = tag_cfg["url"]
        if (Path("~/.cache/clip").expanduser() / os.path.basename(url)).is_file():
            return
        source, host = url, urlparse(url).hostname
    if hub_offline():
        reason = "offline mode is on (HF_HUB_OFFLINE)"
    elif not host_reachable(host or ""):
        reason = f"{host} cannot be reached"
    else:
        return  # open_clip downloads them
    raise VisionWeightsError(
        f"the {model_name} '{tag}' CLIP weights ({source}) are not in the local cache and {reason}. "
        f"Download them once where the hub is reachable, or pass a local checkpoint file as the tower: "
        f"{model_name}:/path/to/weights.safetensors (.safetensors, .bin, .pt or .pth; --vision on the command "
        f"line, VisionConfig.from_spec in Python)"
    )


def hub_offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return flag or bool(constants.HF_HUB_OFFLINE)


def host_reachable(host: str, timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Can we open a TCP connection to host:443 within `timeout` seconds (DNS included)?"""
    if any(os.environ.get(var) for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # only the proxy knows; let the download try
    reachable = threading.Event()

    def probe() -> None:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            reachable.set()
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)  # getaddrinfo ignores socket timeouts
    thread.start()
    thread.join(timeout)
    return reachable.is_set()
