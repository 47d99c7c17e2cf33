"""Each Lua script's builder against the script's own header: as many KEYS and ARGV as
the header documents, in its order, so the two cannot drift apart. No Redis here."""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import cached_aside
from cached_aside import _scripts
from cached_aside._keys import entry_keys
from cached_aside._scripts import RunScript, ScriptName

KEYS = entry_keys("p:{7}")
TOKEN = "t0ken"
TAG = "p:tag:{shop}"

# Every builder with sample arguments; the payload (where there is one) has two items.
CALLS: dict[ScriptName, list[Callable[[], RunScript]]] = {
    ScriptName.ACQUIRE: [
        lambda: _scripts.acquire_call(
            KEYS, token=TOKEN, lock_ttl_ms=1, redis_type="hash", ignore_cached=False
        ),
        lambda: _scripts.acquire_call(
            KEYS, token=TOKEN, lock_ttl_ms=1, redis_type="hash", ignore_cached=True, keep_ms=2
        ),
    ],
    ScriptName.STORE: [
        lambda: _scripts.store_call(
            KEYS, token=TOKEN, kind="string", ttl_ms=1, wake_ttl_ms=2, payload=[b"a", b"b"]
        ),
        lambda: _scripts.store_call(
            KEYS, token=TOKEN, kind=_scripts.RELEASE_ONLY, ttl_ms=0, wake_ttl_ms=2
        ),
    ],
    ScriptName.STORE_TIMED: [
        lambda: _scripts.timed_store_call(
            KEYS,
            token=TOKEN,
            kind="string",
            ttl_ms=1,
            wake_ttl_ms=2,
            load_ms=3,
            payload=[b"a", b"b"],
        ),
        lambda: _scripts.timed_store_call(
            KEYS, token=TOKEN, kind=_scripts.RELEASE_ONLY, ttl_ms=0, wake_ttl_ms=2, load_ms=3
        ),
    ],
    ScriptName.INVALIDATE: [lambda: _scripts.invalidate_call(KEYS, wake_ttl_ms=1)],
    ScriptName.UPDATE_FIELD: [
        lambda: _scripts.update_field_call(
            KEYS, meta_field="m", field="f", value="v", ttl_ms=1, wake_ttl_ms=2, keep_ms=3
        )
    ],
    ScriptName.PEEK: [lambda: _scripts.peek_call(KEYS.value, redis_type="hash")],
    ScriptName.PEEK_TIMED: [
        lambda: _scripts.timed_peek_call(KEYS.value, KEYS.load_ms, redis_type="hash")
    ],
    ScriptName.LEAVE: [lambda: _scripts.leave_call(KEYS, token=TOKEN)],
    ScriptName.RENEW: [lambda: _scripts.renew_call(KEYS, token=TOKEN, lease_ms=1)],
    ScriptName.TAG_RENEW: [lambda: _scripts.tag_renew_call(TAG, life_ms=1)],
    ScriptName.PUT: [
        lambda: _scripts.put_call(KEYS, kind="hash", ttl_ms=1, wake_ttl_ms=2, payload=["f", "v"])
    ],
    ScriptName.REVOKE: [lambda: _scripts.revoke_call(KEYS, wake_ttl_ms=1)],
    ScriptName.TAG_STAMP: [lambda: _scripts.tag_stamp_call(TAG, version="0" * 16, life_ms=1)],
}

# What the header calls each of an entry's keys (the first words of its KEYS[n] item).
ROLES = {
    KEYS.value: "value key",
    KEYS.lock: "lock key",
    KEYS.waiters: "waiters set",
    KEYS.wake: "wake-up lists' prefix",
    KEYS.wake_list(TOKEN): "this waiter's wake-up list",
    KEYS.load_ms: "the entry's load time key",
    TAG: "a tag's version key",
}

# A documented item starts a header line or follows a comma ("TAG_STAMP's ARGV[2]" in
# a description is a reference, not an item).
_ITEM = re.compile(
    r"(?:^|, )(KEYS|ARGV)\[(\d+)(\.\.)?\] ?(\(optional\))?((?:(?!KEYS\[|ARGV\[)[^,])*)", re.M
)


def header(script: ScriptName) -> dict[str, Any]:
    """The items the script's header documents, up to its `returns`: for KEYS and ARGV,
    each index's description, and the index a variadic or optional tail starts at."""
    text = script.value
    lines = [line[3:] for line in text.splitlines() if line.startswith("-- ")]
    start = next(i for i, line in enumerate(lines) if line.startswith("KEYS[1]"))
    end = next(i for i, line in enumerate(lines) if line.startswith("returns"))
    items: dict[str, Any] = {"KEYS": {}, "ARGV": {}, "tail": None, "optional": None}
    for kind, index, variadic, optional, description in _ITEM.findall("\n".join(lines[start:end])):
        items[kind][int(index)] = " ".join(description.split())
        if variadic:
            items["tail"] = int(index)
        if optional:
            items["optional"] = int(index)
    return items


@pytest.mark.parametrize("script", list(ScriptName), ids=lambda s: s.name)
def test_each_builder_lays_out_what_its_header_documents(script: ScriptName) -> None:
    items = header(script)
    keys, argv = items["KEYS"], items["ARGV"]
    assert sorted(keys) == list(range(1, len(keys) + 1)), keys
    assert sorted(argv) == list(range(1, len(argv) + 1)), argv
    assert CALLS[script], f"{script.name} has no builder"
    counts = set()
    for build in CALLS[script]:
        call = build()
        assert call.script is script
        assert len(call.keys) == len(keys)
        for index, key in enumerate(call.keys, 1):
            assert keys[index].startswith(ROLES[key]), (script.name, index, keys[index])
        if items["tail"] is not None:  # a payload of two items after the fixed ones
            fixed = items["tail"] - 1
            assert len(call.args) in (fixed, fixed + 2)
        elif items["optional"] is not None:
            assert len(call.args) in (len(argv), items["optional"] - 1)
        else:
            assert len(call.args) == len(argv)
        for index, arg in enumerate(call.args, 1):
            if arg == TOKEN:
                assert "token" in argv[index], (script.name, index, argv[index])
        counts.add(len(call.args))
    # Where the header leaves ARGV open (a payload, an optional tail), both are built.
    assert len(counts) == len(CALLS[script])


def test_no_call_site_assembles_a_script_call_by_hand() -> None:
    """Only the builders in _scripts construct RunScript."""
    package = Path(cached_aside.__file__).parent
    by_hand = []
    for path in sorted(package.rglob("*.py")):
        if path.name == "_scripts.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "RunScript":
                by_hand.append(f"{path.name}:{node.lineno}")
    assert by_hand == []
