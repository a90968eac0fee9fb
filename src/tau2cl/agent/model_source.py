"""Where a model comes from, checked before transformers tries: one clear line instead of retries.

A name that looks like a local path must exist; a hub id must be in the local Hugging Face cache or
the hub must be reachable (a 3-second connection test), so an offline machine fails at once rather
than after minutes of download retries.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from tau2cl.errors import UserError

HUB_PROBE_SECONDS = 3.0


def looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name.endswith(".gguf") or name.count("/") > 1 or "\\" in name


def check_model_source(name: str) -> None:
    """Raise a UserError when `name` can be neither a local model nor a reachable hub model."""
    local = Path(name).expanduser()
    if local.exists():
        return
    if looks_like_path(name):
        raise UserError(f"model path '{name}' does not exist; check --model_name_or_path.")
    if _in_hub_cache(name) or os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return  # cached, or offline mode: transformers answers from the cache at once
    if not _hub_reachable():
        raise UserError(
            f"model '{name}' is not in the local Hugging Face cache and the hub cannot be reached "
            "(this machine seems offline); download it where there is network, or pass a local folder."
        )


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # not a valid repo id: let transformers say so
        return True


def _hub_reachable() -> bool:
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=HUB_PROBE_SECONDS):
            return True
    except OSError:
        return False
