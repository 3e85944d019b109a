-- Security master tables that ssmd follows by default (CDC_TABLES=events,markets,series_fees).
-- Used by `ssmd dev`, the demo, the sample loader and the integration tests. There are no
-- foreign keys between the tables, so a workload may delete or re-key any row on its own.

CREATE TABLE IF NOT EXISTS events (
    event_ticker  text PRIMARY KEY,
    series_ticker text NOT NULL,
    title         text NOT NULL,
    category      text NOT NULL,
    status        text NOT NULL CHECK (status IN ('open', 'closed', 'settled')),
    close_time    timestamptz,
    tags          text[] NOT NULL DEFAULT '{}',
    metadata      jsonb NOT NULL DEFAULT '{}'
);

CREATE TABLE IF NOT EXISTS markets (
    ticker        text PRIMARY KEY,
    event_ticker  text NOT NULL,
    title         text NOT NULL,
    status        text NOT NULL CHECK (status IN ('initialized', 'open', 'closed', 'settled')),
    yes_bid       numeric(10, 4),
    yes_ask       numeric(10, 4),
    last_price    numeric,
    volume        bigint NOT NULL DEFAULT 0,
    open_interest bigint NOT NULL DEFAULT 0,
    open_time     timestamptz,
    close_time    timestamptz,
    tags          text[],
    metadata      jsonb,
    -- Free text that can exceed 2 kB, so PostgreSQL stores it out of line (TOAST).
    notes         text
);

CREATE INDEX IF NOT EXISTS markets_event_ticker ON markets (event_ticker);

CREATE TABLE IF NOT EXISTS series_fees (
    series_ticker  text NOT NULL,
    effective_from date NOT NULL,
    fee            numeric(8, 5) NOT NULL,
    fee_type       text NOT NULL CHECK (fee_type IN ('quadratic', 'flat', 'maker', 'taker')),
    PRIMARY KEY (series_ticker, effective_from)
);
