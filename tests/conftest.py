"""Shared, session-scoped fixtures: the tiny model (built once, cached) and small tau2 domains.

Loading the tiny model and a domain costs seconds, so every test file shares one copy. Tests that
change weights must work on their own copy (`copy.deepcopy(tiny_model)`), never on `tiny_model`.
"""

from __future__ import annotations

import pytest

from tau2cl.env import tau2_compat  # noqa: F401  (quiet tau2 import before anything imports tau2)

FIXTURE_MAX_TASKS = 2  # tasks per split in the shared domains: enough for every test, fast to load


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from tau2cl.agent.policy import load_tokenizer

    return load_tokenizer("tiny")


@pytest.fixture(scope="session")
def tiny_model():
    """The tiny Qwen2 model in fp32 on CPU, in eval mode. Read-only: copy it before training."""
    from tau2cl.agent.policy import load_model

    return load_model("tiny", "float32", "cpu").eval()


@pytest.fixture(scope="session")
def tiny_policy(tiny_model, tiny_tokenizer):
    from tau2cl.agent.policy import Policy

    return Policy(tiny_model, tiny_tokenizer)


@pytest.fixture(scope="session")
def domains():
    """name -> Domain (airline, retail, telecom) with FIXTURE_MAX_TASKS tasks per split."""
    from tau2cl.env.domains import DOMAIN_NAMES, load_domain

    return {name: load_domain(name, max_tasks=FIXTURE_MAX_TASKS) for name in DOMAIN_NAMES}


@pytest.fixture(scope="module")
def single_torch_thread():
    """One intra-op thread for the module's tiny-model work, restored afterwards.

    The tiny model's ops are too small to gain from threads, and on a busy 2-core machine two
    spinning threads made rollout and training 3-8x slower than one (same numbers either way).
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
