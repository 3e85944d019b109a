"""The Lua scripts decide exactly as ssmd.core.versioning does (fakeredis with Lua)."""

from __future__ import annotations

import asyncio

import fakeredis
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ssmd.core.keys import KeySpace
from ssmd.core.lsn import Lsn
from ssmd.core.position import Position, warm_version
from ssmd.core.versioning import Decision, decide_packed, should_sweep, truncate_clears
from ssmd.store.cache_store import CacheStore, sweep_blocking
from ssmd.store.scripts import APPLIED, BELOW_FLOOR, STALE, Script, ScriptCall, ScriptRunner

VALUE_KEY = "secmaster:market:TEST-1"
VERSION_KEY = "{secmaster:market:TEST-1}:v"
RESULT_OF = {Decision.APPLY: APPLIED, Decision.STALE: STALE, Decision.BELOW_FLOOR: BELOW_FLOOR}

# LSNs around the 32-bit boundary, where text comparison of `X/Y` would go wrong.
lsns = st.sampled_from([0, 1, 9, 10, 0xFFFFFFFF, 0x100000000, 0x1FFFFFFFF, (1 << 64) - 1]) | st.integers(0, (1 << 64) - 1)
positions = st.builds(lambda lsn, index: Position(Lsn(lsn), index), lsns, st.integers(0, 3) | st.integers(0, 0xFFFFFFFF))
operations = st.tuples(st.sampled_from(["write", "delete"]), positions)


def run(coro):
    return asyncio.run(coro)


async def fresh_runner() -> tuple[fakeredis.FakeAsyncRedis, ScriptRunner]:
    client = fakeredis.FakeAsyncRedis()
    runner = ScriptRunner(client)
    await runner.load()
    return client, runner


@settings(max_examples=60, deadline=None)
@given(st.lists(operations, min_size=1, max_size=12), st.none() | positions)
def test_apply_scripts_match_decide(sequence, floor):
    async def scenario():
        client, runner = await fresh_runner()
        stored: str | None = None
        value: bytes | None = None
        floor_text = floor.pack() if floor else ""
        for number, (kind, position) in enumerate(sequence):
            packed = position.pack()
            expected = decide_packed(stored, packed, floor_text or None)
            if kind == "write":
                row = f'{{"n":{number}}}'.encode()
                call = ScriptCall(Script.APPLY_WRITE, (VALUE_KEY, VERSION_KEY), (packed, row, floor_text))
            else:
                row = None
                call = ScriptCall(Script.APPLY_DELETE, (VALUE_KEY, VERSION_KEY), (packed, floor_text))
            [result] = await runner.run([call])
            assert result == RESULT_OF[expected], (kind, position, stored, floor)
            if expected is Decision.APPLY:
                stored, value = packed, row
            assert await client.get(VERSION_KEY) == (stored.encode() if stored else None)
            assert await client.get(VALUE_KEY) == value

    run(scenario())


@settings(max_examples=60, deadline=None)
@given(st.none() | positions, st.booleans(), positions, st.booleans())
def test_sweep_one_matches_sweep_rules(stored, has_value, point, after_warm):
    # After a warm the threshold is the warm version of S; after a TRUNCATE it is its position.
    if after_warm and point.commit_lsn.value == 0:
        point = Position(Lsn(1), point.index)
    threshold = warm_version(point.commit_lsn) if after_warm else point

    async def scenario():
        client, runner = await fresh_runner()
        if stored is not None:
            await client.set(VERSION_KEY, stored.pack())
        if has_value:
            await client.set(VALUE_KEY, b"{}")
        [removed] = await runner.run([ScriptCall(Script.SWEEP_ONE, (VALUE_KEY, VERSION_KEY), (threshold.pack(),))])

        if stored is None:
            expected_gone = has_value
        elif after_warm:
            expected_gone = should_sweep(stored, point.commit_lsn)
        else:
            expected_gone = truncate_clears(stored, point)
        assert removed == int(expected_gone)
        if stored is None or expected_gone:
            assert await client.exists(VALUE_KEY, VERSION_KEY) == 0
        else:
            assert await client.get(VERSION_KEY) == stored.pack().encode()
            assert await client.exists(VALUE_KEY) == int(has_value)

    run(scenario())


def test_merge_script_rejects_changed_base():
    async def scenario():
        client, runner = await fresh_runner()
        await client.set(VERSION_KEY, Position(Lsn(5), 0).pack())
        old_base = Position(Lsn(4), 0).pack()
        call = ScriptCall(Script.APPLY_MERGE, (VALUE_KEY, VERSION_KEY), (Position(Lsn(6), 0).pack(), b"{}", "", old_base))
        assert await runner.run([call]) == [-2]
        current_base = Position(Lsn(5), 0).pack()
        call = ScriptCall(Script.APPLY_MERGE, (VALUE_KEY, VERSION_KEY), (Position(Lsn(6), 0).pack(), b"{}", "", current_base))
        assert await runner.run([call]) == [APPLIED]
        assert await client.get(VALUE_KEY) == b"{}"

    run(scenario())


def test_runner_reloads_after_script_flush():
    async def scenario():
        client, runner = await fresh_runner()
        await client.script_flush()
        call = ScriptCall(Script.APPLY_WRITE, (VALUE_KEY, VERSION_KEY), (Position(Lsn(1), 0).pack(), b"{}", ""))
        assert await runner.run([call]) == [APPLIED]

    run(scenario())


def test_sweep_removes_old_entries_of_namespace_only():
    async def scenario():
        client, _ = await fresh_runner()
        store = CacheStore(client, KeySpace())
        await store.scripts.load()
        old, new = Position(Lsn(10), 0).pack(), Position(Lsn(30), 0).pack()
        await client.set("secmaster:market:OLD", b"{}")
        await client.set("{secmaster:market:OLD}:v", old)
        await client.set("{secmaster:market:GONE}:v", old)  # a tombstone
        await client.set("secmaster:market:NEW", b"{}")
        await client.set("{secmaster:market:NEW}:v", new)
        await client.set("secmaster:market:BARE", b"{}")  # a value without version
        await client.set("secmaster:event:OLD", b"{}")
        await client.set("{secmaster:event:OLD}:v", old)

        removed = await store.sweep("market", Position(Lsn(20), 0))

        assert removed == 3
        remaining = sorted([key.decode() async for key in store.scan("*")])
        assert remaining == ["secmaster:event:OLD", "secmaster:market:NEW", "{secmaster:event:OLD}:v", "{secmaster:market:NEW}:v"]

    run(scenario())


def test_blocking_sweep_matches_async_sweep():
    client = fakeredis.FakeRedis()
    old, new = Position(Lsn(10), 0).pack(), Position(Lsn(30), 0).pack()
    client.set("secmaster:market:OLD", b"{}")
    client.set("{secmaster:market:OLD}:v", old)
    client.set("{secmaster:market:GONE}:v", old)
    client.set("secmaster:market:NEW", b"{}")
    client.set("{secmaster:market:NEW}:v", new)
    client.set("secmaster:market:BARE", b"{}")
    client.set("secmaster:marketing:OLD", b"{}")  # another namespace sharing the prefix text
    client.set("{secmaster:event:OLD}:v", old)

    removed = sweep_blocking(client, KeySpace(), "market", Position(Lsn(20), 0))

    assert removed == 3
    assert sorted(key.decode() for key in client.scan_iter("*")) == [
        "secmaster:market:NEW", "secmaster:marketing:OLD", "{secmaster:event:OLD}:v", "{secmaster:market:NEW}:v",
    ]
