import logging

import pytest

from ssmd.config import CDC_TABLES, parse_int, parse_namespaces, parse_tables, redact_url, require
from ssmd.core.errors import ConfigError
from ssmd.logs import RedactSecrets

SECRET = "s3cr3t-Pa55"


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://ssmd:{SECRET}@127.0.0.1:5432/secmaster?sslmode=require",
        f"host=127.0.0.1 user=ssmd password={SECRET} dbname=secmaster",
        f"host=127.0.0.1 password='{SECRET} x' dbname=secmaster",
        f"nats://{SECRET}@127.0.0.1:4222",
        f"nats://user:{SECRET}@127.0.0.1:4222,nats://user:{SECRET}@127.0.0.1:4223",
        f"rediss://cache:{SECRET}@127.0.0.1:6380/0",
        f"postgresql://ssmd@127.0.0.1/db?password={SECRET}",
    ],
)
def test_redact_url_hides_password(url):
    assert SECRET not in redact_url(url)


def test_redact_url_keeps_host_and_user():
    redacted = redact_url(f"postgresql://ssmd:{SECRET}@db.internal:5432/secmaster")
    assert redacted == "postgresql://ssmd:***@db.internal:5432/secmaster"


def test_log_filter_redacts_url_in_message():
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "connect to %s", (f"redis://u:{SECRET}@h:1/0",), None)
    RedactSecrets().filter(record)
    assert SECRET not in record.getMessage()
    assert "redis://u:***@h:1/0" in record.getMessage()


def test_log_filter_redacts_conninfo_password():
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "dsn host=h password=%s user=u", (SECRET,), None)
    RedactSecrets().filter(record)
    assert SECRET not in record.getMessage()


def test_parse_tables_rejects_bad_name():
    with pytest.raises(ConfigError, match="invalid table name 'markets;drop'"):
        parse_tables("events,markets;drop")


def test_parse_tables_accepts_schema_qualified():
    assert parse_tables(" events, ref.markets ") == ["events", "ref.markets"]


def test_parse_tables_rejects_empty():
    with pytest.raises(ConfigError, match="CDC_TABLES"):
        parse_tables(" , ")


def test_parse_int_names_setting_and_value():
    with pytest.raises(ConfigError, match="invalid CDC_TABLES 'ten'"):
        parse_int("ten", CDC_TABLES)


def test_parse_namespaces_pairs():
    assert parse_namespaces("markets=market, events=event") == {"markets": "market", "events": "event"}
    with pytest.raises(ConfigError, match="expected table=namespace"):
        parse_namespaces("markets")


def test_require_names_env_and_flag():
    with pytest.raises(ConfigError, match="CDC_TABLES is not set.*--cdc-tables"):
        require("", CDC_TABLES)
