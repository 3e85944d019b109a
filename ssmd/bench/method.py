"""The "Method" section of BENCHMARKS.md: how each figure is measured."""

METHOD = """
## Method

One run starts its own PostgreSQL 15 (wal2json), two nats-server instances and one redis-server
on free 127.0.0.1 ports in a temporary directory, loads the sample security master
(`ssmd.dev.sample`, with its edge cases: about 5 % of `last_price` NULL, 1.5 % NaN or
Infinity, 5 % of `notes` large enough to be TOASTed), and stops everything at the end. Phases
run one after another, so no two measured consumers compete for the two CPUs.

**Same WAL for every reader.** Before the generated load, the run creates one wal2json slot per
consumer (pg_recvlogical twice, the baseline, ssmd cdc publish-only, ssmd cdc end-to-end). The load is
N single-row transactions, each `UPDATE markets SET title = ...` of a different row, committed
one by one by a PL/pgSQL procedure. Each consumer then reads the same N transactions from its
own slot.

**Ceiling for reading.** `pg_recvlogical --start --endpos <LSN after the load> --file /dev/null`
with the wal2json options ssmd cdc sends (format-version 2, include-xids, include-lsn,
include-timestamp, include-transaction, include-pk, include-types, add-tables,
add-msg-prefixes). Rate = N / elapsed seconds of the process. It runs twice, from two slots
over the same load: before the cdc phases and right after the last of them, and the ceiling is
the mean of the two rates, because the speed of these shared machines drifts within minutes.

**ssmd cdc publish rate.** `ssmd cdc` alone against an empty stream on its own nats-server. The
clock starts when the first change is in the stream and stops when all N are (stream state
polled every 20 ms), so start-up (imports, connections, start-up checks) is excluded and shown
separately.

**JetStream context rows.** After the publish-only phase, one nats-py client publishes as
many messages as the load has, cycled from 1,000 that ssmd cdc published, with `publish_async`
(window of 4,000 pending PubAcks) into a fresh stream, then reads them back through a durable
pull consumer with `fetch(500)` and one ack per message. These are not ceilings of the
pipeline, which pg_recvlogical bounds, but they show what NATS and one Python client allow on
the same machine at the same moment.

**End-to-end rate.** `ssmd cache` has warmed before the load and is idle; then `ssmd cdc` starts
on its slot. The clock starts when the first change is in the stream and stops when Redis holds
the last transaction's row (`GET` polled every 20 ms). The cache applies changes in stream
order, so the last row arriving means all N arrived.

**Commit-to-Redis latency.** With both daemons running and idle, a paced writer offers 1,000 and
then 5,000 single-row UPDATE transactions per second for 10 s each (2 s in the small size),
with one `CALL` every 5 ms carrying the transactions due by then. Each UPDATE writes `clock_timestamp()` into the row's title while it
runs, right before its COMMIT, so the commit time travels inside the row. A reader in its own
process enables Redis keyspace notifications (`notify-keyspace-events K$`), subscribes to the
market value keys, notes the arrival time of every `set`, reads the row, and takes latency =
arrival time - stamp. Both clocks are the same host's system clock. The stamp is taken before
COMMIT, so the figure includes the commit itself. Rows are reused only after the writer has gone
round its ring of rows (several seconds), so the row read after a notification is the one that
caused it.

**Warm rate.** Rows written by the warm (all three tables) divided by the time from starting
`ssmd cache` on an empty Redis until its meta hash says `state=ready`. That time covers the
exported-snapshot read of every followed table, encoding, versioned pipelined writes and the
sweep (which the first warm of a process skips when Redis held none of the namespaces' entries,
as here). The ceiling is `redis-benchmark` (C) running a pipelined `EVALSHA` of a
compare-and-set script with the same key shape (value key and version key): as many calls as
the warm wrote rows, on 4 connections pipelining 100 calls each, random keys from a range 100
times that count, and a cached row of about the mean size as the value, into another Redis
database. One redis-py + hiredis client doing the same with the warm's batch size and values
cycled from rows of every table is shown as context: it is what a Python client reaches.

**CPU per change.** For the publish, end-to-end and warm rows, the run reads user and system
CPU time of each process tree from `/proc` (the daemon, PostgreSQL's postmaster with its
backends, including finished ones, nats-server and redis-server) at the start and the end of
the timed window, and divides by the number of changes or rows. The share of the two CPUs busy
on average shows whether the machine, rather than one process, was the limit.

**Peak RSS.** `VmHWM` from `/proc/PID/status` of each daemon. Before one transaction that
updates 200,000 rows (the small size uses fewer), the run resets the peak with
`echo 5 > /proc/PID/clear_refs`, so the figure is the peak while that transaction is decoded,
published and applied, not the peak of the warm. The peak since start is shown too.

**Baseline.** The first plan's publisher: the same decoder and envelope, and
`await js.publish(...)` for every message, so each message waits for its PubAck before the next
is sent. It reads its slot through pg_recvlogical writing to a pipe, not with
`pg_logical_slot_get_changes` in batches as the first plan did: each of those calls decodes
again from the slot's restart_lsn, so over a 200,000-transaction backlog it measured mostly
re-decoding (about 770 changes/s in a trial run, against about 1,900/s streamed on a similar
load). It confirms nothing and re-reads no TOAST or NaN column. It exists only to price
awaiting every acknowledgement.
"""
