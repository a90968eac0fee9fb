"""db_hash: tau2's database hash, built from records' reused JSON texts, is tau2's hash exactly."""

from __future__ import annotations

import datetime

import pytest

from tau2cl.env import tau2_compat  # noqa: F401  (quiet tau2 import)

# isort: split
from tau2.utils.utils import get_dict_hash

from tau2cl.env import db_hash
from tau2cl.env.domains import DOMAIN_NAMES


@pytest.fixture(autouse=True)
def cold():
    db_hash.clear()
    yield
    db_hash.clear()


def test_numbers_equal_in_python_but_not_in_json_hash_apart():
    # 1 == 1.0 == True, but json.dumps writes 1, 1.0 and true: three hashes, each tau2's
    dumps = [{"users": {"u1": {"n": v, "tags": ["a"]}}, "meta": {"version": 2}} for v in (1.0, 1, True, 1.0)]
    hashes = [db_hash.dict_hash(d) for d in dumps]  # the first and last dumps hash the same record twice
    assert hashes == [get_dict_hash(d) for d in dumps]
    assert len(set(hashes)) == 3 and hashes[0] == hashes[3]
    assert db_hash.dumps(dumps[2]) == '{"meta": {"version": 2}, "users": {"u1": {"n": true, "tags": ["a"]}}}'


def test_other_shapes_and_types_are_tau2s():
    stamp = datetime.datetime(2024, 5, 1, 12, 30)
    for data in (
        {"t": {"b": {"when": stamp}, "a": {"when": stamp.date()}}},  # marshal refuses: pickled, str() in JSON
        {"t": {1: {"x": 1}}},  # an int key: not this module's shape, tau2 hashes it
        {"t": [{"x": 1}], "s": "plain", "e": {}},
        {},
    ):
        assert db_hash.dict_hash(data) == get_dict_hash(data), data
        assert db_hash.dict_hash(data) == get_dict_hash(data), f"{data} (texts reused)"
    assert db_hash.dumps({1: {}}) is None


@pytest.mark.parametrize("name", DOMAIN_NAMES)
def test_environment_hashes_equal_tau2s_before_and_after_a_write(domains, name):
    env = domains[name].base_environment()
    assert db_hash.agent_hash(env) == env.get_db_hash()
    assert db_hash.user_hash(env) == env.get_user_db_hash()
    # change one record in place, as a tool does: only its text is encoded again
    table = next(t for t in env.tools.db.__dict__.values() if t)  # records by id (dict) or a list
    record = next(iter(table.values())) if isinstance(table, dict) else table[0]
    field = next(k for k, v in record.__dict__.items() if isinstance(v, str))
    before = db_hash.agent_hash(env)
    setattr(record, field, record.__dict__[field] + " changed")
    after = db_hash.agent_hash(env)
    assert after == env.get_db_hash() != before
