"""Sample security-master data: a seeded row factory and a fast COPY loader.

The rows look like a prediction-market security master: series, events, markets and fees.
With `edge_cases` on, they also carry values that break naive CDC pipelines. These are numeric
NaN and Infinity, trailing zeros, array elements that need quoting or are NULL, nested and
unicode jsonb, and `notes` large enough to be stored out of line (TOAST).

Run `python -m ssmd.dev.sample --markets 10000` to load into DATABASE_URL.
"""

from __future__ import annotations

import argparse
import os
import random
import string
import sys
from dataclasses import asdict, dataclass
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from importlib import resources

import psycopg
from psycopg.types.json import Jsonb

from ssmd.config import DATABASE_URL, redact_url, require

EVENT_COLUMNS = ("event_ticker", "series_ticker", "title", "category", "status", "close_time", "tags", "metadata")
MARKET_COLUMNS = (
    "ticker", "event_ticker", "title", "status", "yes_bid", "yes_ask", "last_price", "volume",
    "open_interest", "open_time", "close_time", "tags", "metadata", "notes",
)
FEE_COLUMNS = ("series_ticker", "effective_from", "fee", "fee_type")

MARKETS_PER_EVENT = 4
EVENTS_PER_SERIES = 5
FEES_PER_SERIES = 3

_TOPICS = ("HIGHNY", "RAINSEA", "FED", "CPI", "GDP", "NBA", "NFL", "BTC", "ETH", "OIL", "GOLD", "SNOWDEN")
_CATEGORIES = ("Climate", "Economics", "Sports", "Crypto", "Commodities", "Politics")
_TAG_WORDS = ("weekly", "daily", "featured", "new", "high-volume", "macro", "us")
# Array elements that PostgreSQL has to quote or escape in an array literal.
_AWKWARD_TAGS = ("two words", 'say "hi"', "a,b", "", "{braced}", "back\\slash", "café", "NULL", "null")
_STATES = ("open", "closed", "settled")
_BASE_TIME = datetime(2026, 1, 1, tzinfo=timezone.utc)


def schema_sql() -> str:
    return resources.files("ssmd").joinpath("sql/schema.sql").read_text()


def apply_schema(conninfo: str) -> None:
    """Create the secmaster tables if they do not exist yet."""
    with psycopg.connect(conninfo, autocommit=True) as connection:
        connection.execute(schema_sql())


@dataclass(frozen=True)
class SampleCounts:
    events: int
    markets: int
    series_fees: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class RowFactory:
    """Seeded source of realistic rows; the same seed gives the same rows."""

    def __init__(self, rng: random.Random, *, edge_cases: bool = True) -> None:
        self.rng = rng
        self.edge_cases = edge_cases

    def series_ticker(self, index: int) -> str:
        return f"KX{_TOPICS[index % len(_TOPICS)]}{index // len(_TOPICS) or ''}"

    def event_ticker(self, series_ticker: str, index: int) -> str:
        day = _BASE_TIME + timedelta(days=index)
        return f"{series_ticker}-{day:%y%b%d}".upper() + (f"-{index}" if index >= 365 else "")

    def market_ticker(self, event_ticker: str, index: int) -> str:
        return f"{event_ticker}-T{40 + index * 5}" if index < 20 else f"{event_ticker}-B{index}"

    def event(self, event_ticker: str, series_ticker: str) -> tuple:
        rng = self.rng
        return (
            event_ticker,
            series_ticker,
            self.title(event_ticker),
            rng.choice(_CATEGORIES),
            rng.choice(_STATES),
            self.timestamp(nullable=True),
            self.tags(),
            Jsonb(self.metadata()),
        )

    def market(self, ticker: str, event_ticker: str) -> tuple:
        rng = self.rng
        bid = Decimal(rng.randint(1, 98)) / 100
        open_time = self.timestamp(nullable=False)
        return (
            ticker,
            event_ticker,
            self.title(ticker),
            rng.choice(("initialized", "open", "open", "open", "closed", "settled")),
            bid,
            bid + Decimal(rng.randint(1, 3)) / 100,
            self.price(),
            rng.randint(0, 5_000_000),
            rng.randint(0, 500_000),
            open_time,
            open_time + timedelta(days=rng.randint(1, 90), microseconds=rng.randint(0, 999_999)),
            self.tags() if rng.random() < 0.9 else None,
            Jsonb(self.metadata()) if rng.random() < 0.9 else None,
            self.notes(),
        )

    def fee(self, series_ticker: str, effective_from: date) -> tuple:
        return (series_ticker, effective_from, self.fee_value(), self.rng.choice(("quadratic", "flat", "maker", "taker")))

    def fee_value(self) -> Decimal:
        # numeric(8, 5) keeps trailing zeros, e.g. 0.07000.
        return Decimal(self.rng.randint(0, 1500)) / 10000

    def price(self) -> Decimal | None:
        roll = self.rng.random()
        if self.edge_cases and roll < 0.01:
            return Decimal("NaN")
        if self.edge_cases and roll < 0.015:
            return self.rng.choice((Decimal("Infinity"), Decimal("-Infinity")))
        if roll < 0.05:
            return None
        # Unconstrained numeric keeps the scale it was given: 0.5 and 0.5000 are different text.
        return Decimal(self.rng.randint(1, 99)) / 100 if roll < 0.5 else Decimal(f"{self.rng.randint(1, 99) / 100:.4f}")

    def title(self, ticker: str) -> str:
        if self.edge_cases and self.rng.random() < 0.1:
            return f"Will “{ticker}” close above 100°F? — 'quoted' \\ tab\there"
        return f"Will {ticker} resolve Yes?"

    def tags(self) -> list[str | None]:
        rng = self.rng
        tags: list[str | None] = rng.sample(_TAG_WORDS, rng.randint(0, 3))
        if self.edge_cases and rng.random() < 0.2:
            tags.append(rng.choice(_AWKWARD_TAGS))
        if self.edge_cases and rng.random() < 0.05:
            tags.append(None)
        return tags

    def metadata(self) -> dict:
        rng = self.rng
        metadata: dict = {"source": rng.choice(("exchange", "manual")), "rank": rng.randint(1, 1000)}
        if self.edge_cases and rng.random() < 0.3:
            metadata["settlement"] = {"sources": ["NWS", "AP"], "strike": 1.10, "note": "naïve — ok", "empty": {}}
            metadata["flags"] = [True, False, None]
        return metadata

    def notes(self) -> str | None:
        roll = self.rng.random()
        if roll < 0.5:
            return None
        if roll < 0.95:
            return "Rules: resolves per the official source."
        # Random letters compress poorly, so 6 kB stays above the 2 kB TOAST threshold after
        # compression and is stored out of line.
        return "".join(self.rng.choices(string.ascii_letters + " ", k=6000))

    def timestamp(self, *, nullable: bool) -> datetime | None:
        if nullable and self.rng.random() < 0.1:
            return None
        return _BASE_TIME + timedelta(seconds=self.rng.randint(0, 365 * 86400), microseconds=self.rng.randint(0, 999_999))


def load_sample(conninfo: str, *, markets: int = 1000, seed: int = 0, edge_cases: bool = True) -> SampleCounts:
    """Create the tables and COPY about `markets` markets with their events, series and fees.

    A table that already has rows is skipped, so loading twice adds nothing. The returned counts
    are the rows loaded.
    """
    apply_schema(conninfo)
    factory = RowFactory(random.Random(seed), edge_cases=edge_cases)
    event_count = max(1, -(-markets // MARKETS_PER_EVENT))
    series_count = max(1, -(-event_count // EVENTS_PER_SERIES))

    series = [factory.series_ticker(index) for index in range(series_count)]
    events = [factory.event(factory.event_ticker(series[index % series_count], index), series[index % series_count]) for index in range(event_count)]
    market_rows = [
        factory.market(factory.market_ticker(events[index % event_count][0], index // event_count), events[index % event_count][0])
        for index in range(markets)
    ]
    fees = [factory.fee(ticker, date(2025, 1, 1) + timedelta(days=90 * step)) for ticker in series for step in range(FEES_PER_SERIES)]

    with psycopg.connect(conninfo) as connection:
        loaded = SampleCounts(
            events=_copy_rows(connection, "events", EVENT_COLUMNS, events),
            markets=_copy_rows(connection, "markets", MARKET_COLUMNS, market_rows),
            series_fees=_copy_rows(connection, "series_fees", FEE_COLUMNS, fees),
        )
        connection.commit()
    return loaded


def _copy_rows(connection: psycopg.Connection, table: str, columns: tuple[str, ...], rows: list[tuple]) -> int:
    if connection.execute(f"SELECT EXISTS (SELECT FROM {table})").fetchone()[0]:
        return 0
    with connection.cursor() as cursor:
        with cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
    return len(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ssmd.dev.sample", description="Load sample secmaster rows with COPY.")
    parser.add_argument("--database-url", default=os.environ.get(DATABASE_URL.env), help="PostgreSQL URL (env DATABASE_URL)")
    parser.add_argument("--markets", type=int, default=1000, help="number of market rows; events, series and fees scale with it (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--no-edge-cases", action="store_true", help="leave out NaN, awkward array elements and large notes")
    args = parser.parse_args(argv)

    conninfo = require(args.database_url, DATABASE_URL)
    counts = load_sample(conninfo, markets=args.markets, seed=args.seed, edge_cases=not args.no_edge_cases)
    print(f"loaded into {redact_url(conninfo)}: " + ", ".join(f"{table}={count}" for table, count in counts.as_dict().items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
