"""Where a model comes from, checked before transformers tries: one clear line instead of retries.

A name that looks like a local path must exist; a hub id must be in the local Hugging Face cache or
the hub must be reachable (its name resolved and a connection opened, within 3 seconds in all), so
an offline machine fails at once rather than after minutes of download retries. Nothing here
imports torch, transformers or tau2: a run's start checks its model before loading them.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

from tau2cl.errors import UserError

HUB_PROBE_SECONDS = 3.0  # the hub probe's whole budget: name lookup and connection


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


def _hub_reachable(seconds: float = HUB_PROBE_SECONDS) -> bool:
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (443 if url.scheme == "https" else 80)
    return reachable(url.hostname or "huggingface.co", port, seconds)


def reachable(host: str, port: int, seconds: float, resolve: Callable[..., list] = socket.getaddrinfo) -> bool:
    """Whether a TCP connection to host:port opens within `seconds`, the name lookup included."""
    deadline = time.monotonic() + seconds
    addresses = resolve_within(host, port, seconds, resolve)
    for *_, address in addresses or []:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        try:
            with socket.create_connection(address[:2], timeout=left):
                return True
        except OSError:
            continue
    return False


def resolve_within(host: str, port: int, seconds: float, resolve: Callable[..., list] = socket.getaddrinfo) -> list | None:
    """`resolve(host, port)`'s addresses, or None when the lookup fails or outlasts `seconds`.

    getaddrinfo takes no timeout and can wait half a minute on a machine without DNS, so it runs
    in a daemon thread that is left behind at the deadline.
    """
    found: list[list] = []

    def lookup() -> None:
        try:
            found.append(resolve(host, port, type=socket.SOCK_STREAM))
        except (OSError, UnicodeError):
            pass

    worker = threading.Thread(target=lookup, name="hub-name-lookup", daemon=True)
    worker.start()
    worker.join(seconds)
    return found[0] if found else None
