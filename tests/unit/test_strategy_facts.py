"""The registry's facts about each strategy drive config validation and `--cl_algorithm`'s help."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest

from tau2cl.cl.strategies.registry import (
    CL_ALGORITHMS,
    HELP_ORDER,
    NEEDS_LORA,
    STRATEGIES,
    StrategyEntry,
)
from tau2cl.config import GRPOConfig, build_parser, cl_algorithm_help
from tau2cl.errors import UserError


def _cl_algorithm_help_text() -> str:
    (action,) = [a for a in build_parser()._actions if "--cl_algorithm" in a.option_strings]
    return action.help


def _refused(**values) -> str | None:
    try:
        GRPOConfig(**values)
    except UserError as error:
        return str(error)
    return None


def test_a_strategy_marked_needs_lora_is_refused_without_lora_r(monkeypatch):
    toy = replace(STRATEGIES["replay"], needs_lora=True, lora_reason="it trains a toy adapter")
    monkeypatch.setitem(STRATEGIES, "replay", toy)
    assert _refused(cl_algorithm="replay") == "--cl_algorithm replay needs --lora_r > 0: it trains a toy adapter."
    assert _refused(cl_algorithm="replay", lora_r=4) is None


def test_a_strategy_not_marked_needs_lora_runs_without_lora_r(monkeypatch):
    assert _refused(cl_algorithm="progressive") is not None
    monkeypatch.setitem(STRATEGIES, "progressive", replace(STRATEGIES["progressive"], needs_lora=False))
    assert _refused(cl_algorithm="progressive") is None


def test_a_strategy_marked_not_for_fsdp_is_refused_under_fsdp_only(monkeypatch):
    toy = replace(STRATEGIES["sequential"], works_with_fsdp=False, fsdp_reason="its toy state is whole")
    monkeypatch.setitem(STRATEGIES, "sequential", toy)
    assert _refused(parallelism="fsdp") == "--cl_algorithm sequential needs --parallelism ddp: its toy state is whole."
    assert _refused(parallelism="ddp") is None
    monkeypatch.setitem(STRATEGIES, "ewc", replace(STRATEGIES["ewc"], works_with_fsdp=True))
    assert _refused(cl_algorithm="ewc", parallelism="fsdp") is None


def test_the_registered_facts_refuse_exactly_the_ewc_family_under_fsdp_and_progressive_without_lora():
    under_fsdp = {name for name in CL_ALGORITHMS if _refused(cl_algorithm=name, parallelism="fsdp", lora_r=8)}
    assert under_fsdp == {"ewc", "online_ewc", "ewc_pp"}
    assert _refused(cl_algorithm="online_ewc", parallelism="fsdp") == (
        "--cl_algorithm online_ewc needs --parallelism ddp: its Fisher comes from per-episode gradients of the "
        "whole model, which FSDP shards across processes."
    )
    without_lora = {name for name in CL_ALGORITHMS if _refused(cl_algorithm=name)}
    assert without_lora == {"progressive"} and NEEDS_LORA == ("progressive",)


def test_a_limit_without_its_reason_cannot_be_registered():
    with pytest.raises(ValueError, match="lora_reason"):
        StrategyEntry("m", "Toy", "a toy", needs_lora=True)
    with pytest.raises(ValueError, match="fsdp_reason"):
        StrategyEntry("m", "Toy", "a toy", works_with_fsdp=False)


def test_the_help_describes_every_registered_strategy_with_its_summary_in_help_order():
    text = _cl_algorithm_help_text()
    assert text.startswith("Strategy against forgetting: sequential = plain fine-tuning, one domain after another; ")
    found = [text.index(f"{name} = {STRATEGIES[name].summary}") for name in HELP_ORDER]
    assert found == sorted(found) and set(HELP_ORDER) == set(STRATEGIES)
    assert text.endswith("with the same step budget (no extra cost). (default: sequential)")


def test_a_newly_registered_strategy_is_described_after_the_others(monkeypatch):
    monkeypatch.setitem(STRATEGIES, "toy", StrategyEntry("toy_module", "Toy", "a toy that forgets nothing"))
    text = cl_algorithm_help()
    assert text.endswith("; toy = a toy that forgets nothing.")
    assert len(re.findall(r"(?:: |; )(\w+) = ", text)) == len(STRATEGIES) == len(CL_ALGORITHMS) + 1


def test_every_strategy_that_needs_lora_says_so_in_its_summary():
    for name, entry in STRATEGIES.items():
        assert ("--lora_r" in entry.summary) == entry.needs_lora, name
