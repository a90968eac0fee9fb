"""A model that cannot be had fails at once with one line: a missing path, or an offline hub id."""

from __future__ import annotations

import time

import pytest

import tau2cl.agent.model_source as model_source
from tau2cl.agent.model_source import check_model_source
from tau2cl.errors import UserError


def test_a_path_that_does_not_exist_says_so(tmp_path):
    for name in (str(tmp_path / "typo"), "./models/typo", "~/nowhere/m.gguf"):
        with pytest.raises(UserError, match=r"^model path '.*' does not exist; check --model_name_or_path\.$"):
            check_model_source(name)
    check_model_source(str(tmp_path))  # an existing folder passes (transformers reads it)


def test_an_uncached_hub_id_on_an_offline_machine_fails_fast(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    start = time.perf_counter()
    with pytest.raises(UserError, match=r"^model 'nobody/not-cached-anywhere' is not in the local Hugging Face cache"):
        check_model_source("nobody/not-cached-anywhere")
    assert time.perf_counter() - start < 5
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline mode: the cache alone answers, no probe
    monkeypatch.setattr(model_source, "_hub_reachable", lambda: pytest.fail("probed the hub"))
    check_model_source("nobody/not-cached-anywhere")
