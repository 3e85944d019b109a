"""The `ssmd` command line: one subcommand per process or tool.

Each subcommand lives in its own module, imported only when chosen, that provides
`add_arguments(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ssmd.core.errors import SsmdError

SUBCOMMANDS = (
    ("cdc", "ssmd.cdc.command", "publish wal2json changes from PostgreSQL to NATS JetStream"),
    ("cache", "ssmd.cache.command", "warm Redis from a snapshot and apply the change stream"),
    ("verify", "ssmd.verify", "compare every followed table with the Redis cache"),
    ("status", "ssmd.status", "show slot, stream, consumer and cache state"),
    ("sim", "ssmd.simcli", "run the deterministic simulator over seeds"),
    ("dev", "ssmd.dev.command", "start or stop a throwaway local stack"),
    ("bench", "ssmd.bench.command", "measure throughput and latency against ceilings"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssmd", description="Redis cache of a PostgreSQL security master, fed by CDC.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name, help_text in SUBCOMMANDS:
        subparser = subparsers.add_parser(name, help=help_text, description=help_text)
        subparser.set_defaults(module_name=module_name)
        if name in _chosen_commands():
            _load(module_name).add_arguments(subparser)
    return parser


def main(argv: list[str] | None = None) -> int:
    global _argv
    _argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(_argv)
    try:
        return int(_load(args.module_name).run(args) or 0)
    except SsmdError as exc:
        print(f"ssmd {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader of our output went away (`ssmd sim --trace | head`). Point stdout at
        # /dev/null so the interpreter's final flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


_argv: list[str] = []


def _chosen_commands() -> set[str]:
    # The top-level parser has no options of its own, so the first word is the subcommand.
    # Only that module is imported, which keeps `ssmd sim` free of driver imports.
    words = [word for word in _argv if not word.startswith("-")]
    return set(words[:1])


def _load(module_name: str):
    return importlib.import_module(module_name)
