"""The network side of loading weights: is the hub reachable, and reading the local cache only when it is not."""

from __future__ import annotations

import os

OFFLINE_HINT = ("offline, load a local weights file: tpsvit.load_model(NAME, checkpoint=FILE), `--model NAME "
                "--checkpoint FILE` on the CLI, or timm.create_model(NAME, pretrained=True, "
                "pretrained_cfg_overlay=dict(file=FILE)); weights downloaded before load from the cache with "
                "HF_HUB_OFFLINE=1")


def hub_offline_requested() -> bool:
    """HF_HUB_OFFLINE is set: read the local cache only, never try the network."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def reachable(host: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to ``host`` port 443 opens within ``timeout`` seconds (name lookup included)."""
    import socket

    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


class hub_offline:
    """Within the block, huggingface_hub reads its local cache only (as with HF_HUB_OFFLINE=1)."""

    def __enter__(self):
        try:
            from huggingface_hub import constants
        except ImportError:
            self.constants = None
            return self
        self.constants, self.before = constants, constants.HF_HUB_OFFLINE
        constants.HF_HUB_OFFLINE = True
        return self

    def __exit__(self, *exc):
        if self.constants is not None:
            self.constants.HF_HUB_OFFLINE = self.before
        return False
