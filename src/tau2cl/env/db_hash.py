"""tau2's database hash, with the JSON text of records already encoded reused.

tau2 hashes a database as `sha256(json.dumps(db.model_dump(), sort_keys=True, default=str))`: for
airline a 3.4 MB string, ~60 ms of `json.dumps` on top of ~25 ms of `model_dump`. A scored database
is mostly the domain's stored records (a task changes a few of them), so the same string is built
here from one JSON text per record: a record's text is reused when its id and dump marshal (or,
for types marshal does not take, pickle) to the same bytes as a record encoded before, and encoded
by `json.dumps` otherwise. Equal bytes mean the same types and values all the way down (1, 1.0
and True compare equal but marshal differently), so `json.dumps` would give the same text;
marshalling a record costs about half of encoding it. The string is
joined exactly as `json.dumps` joins a dict (keys sorted, ", " and ": " separators), so the hash is
the same; a database whose dump has another shape (a key that is not a string) is hashed by tau2.
"""

from __future__ import annotations

import hashlib
import json
import marshal
import pickle
import threading
from json.encoder import encode_basestring_ascii as _key
from typing import Any

from tau2cl.env import tau2_compat  # noqa: F401  (first: quiets tau2's import)

# isort: split
from tau2.environment.environment import Environment
from tau2.environment.toolkit import ToolKitBase
from tau2.utils.utils import get_dict_hash

MAX_TEXTS = 50_000  # records' JSON texts kept per process (airline's database: ~2,800 records)

_texts: dict[bytes, str] = {}
_lock = threading.Lock()


def agent_hash(env: Any) -> Any:
    """`env.get_db_hash()` of a tau2 environment."""
    if type(env).get_db_hash is not Environment.get_db_hash:
        return env.get_db_hash()
    return toolkit_hash(env.tools)


def user_hash(env: Any) -> Any:
    """`env.get_user_db_hash()` of a tau2 environment."""
    if type(env).get_user_db_hash is not Environment.get_user_db_hash:
        return env.get_user_db_hash()
    return toolkit_hash(env.user_tools)


def toolkit_hash(toolkit: Any) -> str | None:
    """A toolkit's `get_db_hash()` (None: no toolkit)."""
    if toolkit is None:
        return None
    if type(toolkit).get_db_hash is not ToolKitBase.get_db_hash:
        return toolkit.get_db_hash()
    return dict_hash(toolkit.db.model_dump())


def dict_hash(data: Any) -> str:
    """tau2's `get_dict_hash(data)` for a database dump {table: {id: record}}."""
    text = dumps(data)
    if text is None:
        return get_dict_hash(data)
    return hashlib.sha256(text.encode()).hexdigest()


def dumps(data: Any) -> str | None:
    """`json.dumps(data, sort_keys=True, default=str)` for a dict with string keys, else None.

    Its values that are dicts with string keys (tables of records by id) or lists (of records)
    are joined from their records' texts.
    """
    if not _string_keyed(data):
        return None
    parts = []
    for key in sorted(data):
        value = data[key]
        if _string_keyed(value):
            body = ", ".join([_entry_text(k, value[k]) for k in sorted(value)])
            parts.append(f"{_key(key)}: {{{body}}}")
        elif isinstance(value, list):
            parts.append(f"{_key(key)}: [{', '.join([_entry_text(None, item) for item in value])}]")
        else:
            parts.append(f"{_key(key)}: {_plain(value)}")
    return "{" + ", ".join(parts) + "}"


def clear() -> None:
    """Forget every record's JSON text."""
    with _lock:
        _texts.clear()


def _string_keyed(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) for k in value)


def _plain(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _entry_text(key: str | None, record: Any) -> str:
    """`"key": <record's JSON>` (a list's item: no key), the text reused when it was encoded before."""
    if not isinstance(record, dict | list):
        return _encode(key, record)
    code = _code(key, record)
    if code is None:
        return _encode(key, record)
    text = _texts.get(code)
    if text is None:
        text = _encode(key, record)
        with _lock:
            if len(_texts) >= MAX_TEXTS:
                _texts.clear()
            _texts[code] = text
    return text


def _encode(key: str | None, record: Any) -> str:
    return _plain(record) if key is None else f"{_key(key)}: {_plain(record)}"


def _code(key: str | None, record: Any) -> bytes | None:
    """Bytes that only an equal (key, record) has: same types and values all the way down."""
    try:  # marshal (format 2: no back-references) takes builtin types only, and is the faster
        return b"m" + marshal.dumps((key, record), 2)
    except ValueError:
        pass
    try:
        return b"p" + pickle.dumps((key, record), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # something pickle cannot write: encode it, keep nothing
        return None
