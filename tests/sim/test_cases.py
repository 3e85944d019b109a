"""Fault cases as explicit simulator scenarios: interleaved transactions, warm race, redelivery."""

import itertools

import pytest

from sim.cache import MAX_DELIVER, NAK_DELAY
from sim.world import Result, World
from tests.sim.helpers import describe


def ready_world(strategy: str = "correct", seed: int = 1) -> World:
    """Return a world whose pipeline has drained and whose cache finished its first warm."""
    world = World(seed, strategy)
    world.quiesce()
    assert world.cache.warm is not None and world.cache.warm.done
    return world


def market(ticker: str, status: str = "open") -> dict:
    return {"event_ticker": "E-1", "ticker": ticker, "status": status, "notes": None}


def insert_markets(world: World, *tickers: str) -> None:
    transaction = world.begin()
    for ticker in tickers:
        world.insert(transaction, "markets", market(ticker))
    world.commit(transaction, visible_delay=0)
    world.quiesce()


def finish(world: World) -> Result:
    world.quiesce()
    return Result(world.seed, world.strategy, world.check(), world.trace)


# --- interleaved transactions --------------------------------------------------------------


def interleaved(strategy: str) -> tuple[World, Result]:
    world = ready_world(strategy)
    insert_markets(world, "TEST-1", "TEST-2")

    a = world.begin()
    world.update(a, "markets", ("TEST-1",), status="halted")
    b = world.begin()
    world.update(b, "markets", ("TEST-2",), status="closed")
    world.commit(b, visible_delay=0)
    world.log(world.cache.begin_warm(world.db, world.stream, world.now, "scenario warm between commits"))
    world.commit(a, visible_delay=0)

    assert a.changes[0].change_lsn < b.changes[0].change_lsn
    assert a.commit_lsn > b.commit_lsn
    assert a.commit_lsn == world.cache.warm.snapshot_lsn  # commits exactly at the consistent point
    while world.cache.can_warm():  # the warm rows land before A's change is applied
        world.tick()
        world.log(world.cache.warm_step(world.db, world.now, 2))
    return world, finish(world)


def test_interleaved_transactions_reach_cache():
    world, result = interleaved("correct")
    assert result.violations == [], describe(result)
    assert world.cached("markets", "TEST-1")["status"] == "halted"
    assert world.cached("markets", "TEST-2")["status"] == "closed"


def test_interleaved_transactions_break_change_lsn_order():
    world, result = interleaved("change-lsn-order")
    assert "convergence" in result.invariants, describe(result)
    assert world.cached("markets", "TEST-1")["status"] == "open"


# --- warm race -----------------------------------------------------------------------------


def warm_race(strategy: str, applied_before_warm_ends: int, chunk: int) -> tuple[World, Result]:
    """Commit four changes while a warm runs; apply some of them before the warm finishes."""
    world = ready_world(strategy)
    insert_markets(world, "TEST-1", "TEST-2", "TEST-4")
    world.log(world.cache.begin_warm(world.db, world.stream, world.now, "scenario warm"))
    world.log(world.cache.warm_step(world.db, world.now, chunk))  # part of markets written

    for write in (
        lambda t: world.update(t, "markets", ("TEST-1",), status="halted"),
        lambda t: world.delete(t, "markets", ("TEST-2",)),
        lambda t: world.insert(t, "markets", market("TEST-3")),
        lambda t: world.update(t, "markets", ("TEST-4",), status="settled"),
    ):
        transaction = world.begin()
        write(transaction)
        world.commit(transaction, visible_delay=0)
    world.publish_all()
    world.deliver_all()

    for _ in range(applied_before_warm_ends):
        if world.cache.handling:
            world.log(world.handle(0))
    while world.cache.can_warm():
        world.tick()
        world.log(world.cache.warm_step(world.db, world.now, chunk))
    return world, finish(world)


@pytest.mark.parametrize("applied, chunk", itertools.product(range(6), (1, 2, 10)))
def test_warm_race_every_interleaving(applied, chunk):
    world, result = warm_race("correct", applied, chunk)
    assert result.violations == [], describe(result)
    assert world.cached("markets", "TEST-1")["status"] == "halted"
    assert world.cached("markets", "TEST-2") is None
    assert world.cached("markets", "TEST-3") is not None
    assert world.cached("markets", "TEST-4")["status"] == "settled"


def test_warm_race_without_tombstone_resurrects():
    results = [warm_race("del-without-tombstone", applied, 1)[1] for applied in range(6)]
    assert any("no-resurrection" in result.invariants for result in results)


# --- redelivery out of order ---------------------------------------------------------------


def redelivery(strategy: str) -> tuple[World, Result]:
    world = ready_world(strategy)
    insert_markets(world, "TEST-1")
    for status in ("open", "halted"):
        transaction = world.begin()
        world.update(transaction, "markets", ("TEST-1",), status=status)
        world.commit(transaction, visible_delay=0)
    world.publish_all()

    assert world.deliver_all() == 2  # e1 stalls in the handler, e2 waits behind it
    world.log(world.handle(1))  # e2 applied at once
    world.tick(world.params.ack_wait + 1)
    assert world.deliver_all() == 1  # e1 redelivered after ack_wait
    assert "(redelivery)" in world.trace[-1]
    world.log(world.handle(1))  # the redelivered e1
    world.log(world.handle(0))  # the stalled first delivery of e1 finally completes
    return world, finish(world)


def test_redelivery_out_of_order_keeps_newest():
    world, result = redelivery("correct")
    assert result.violations == [], describe(result)
    assert world.cached("markets", "TEST-1")["status"] == "halted"


def test_redelivery_out_of_order_breaks_blind_set():
    world, result = redelivery("blind-set")
    assert "monotonic" in result.invariants, describe(result)
    assert world.cached("markets", "TEST-1")["status"] == "open"


def test_always_failing_message_is_terminated_and_rewarmed():
    world = ready_world()
    insert_markets(world, "TEST-1")
    transaction = world.begin()
    world.update(transaction, "markets", ("TEST-1",), status="halted")
    world.commit(transaction, visible_delay=0)
    world.publish_all()
    seq = world.stream.last_seq
    world.stream.messages[seq].failures_left = 1_000_000

    for delivery in range(1, MAX_DELIVER + 1):
        world.tick(NAK_DELAY + 1)
        assert world.deliver_all() == 1
        world.log(world.handle(0))
        assert world.stream.deliveries[seq] == delivery
    assert "terminated; warm begin" in world.trace[-1]
    world.tick(world.params.ack_wait + 1)
    assert world.deliver_all() == 0  # never delivered again

    result = finish(world)
    assert result.violations == [], describe(result)
    assert world.cached("markets", "TEST-1")["status"] == "halted"
