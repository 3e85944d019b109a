"""compose.yaml and its Dockerfiles, checked as text: no Docker engine is needed.

The daemons' commands and environment names are checked against the real `ssmd` command line,
so renaming a setting or a subcommand without updating compose.yaml fails here.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from ssmd import cli, config

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]
DAEMONS = {"ssmd-cdc": "cdc", "ssmd-cache": "cache"}


def _interpolate(value: str) -> str:
    # Compose replaces ${NAME:-default} with the default when NAME is unset.
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


@functools.cache
def _env_names_in_help(subcommand: str) -> frozenset[str]:
    environment = {**os.environ, "COLUMNS": "400"}
    result = subprocess.run([sys.executable, "-m", "ssmd", subcommand, "--help"], capture_output=True, text=True, timeout=60, env=environment)
    assert result.returncode == 0, result.stderr
    return frozenset(re.findall(r"\(env ([A-Z][A-Z0-9_]*)", result.stdout))


def test_compose_service_names():
    assert set(SERVICES) == {"postgres", "nats", "redis", "ssmd-cdc", "ssmd-cache"}


def test_postgres_image_has_wal2json():
    service = SERVICES["postgres"]
    dockerfile = (ROOT / service["build"]["context"] / service["build"]["dockerfile"]).read_text()

    assert re.search(r"^FROM postgres:15\b", dockerfile, re.MULTILINE)
    assert "postgresql-15-wal2json" in dockerfile
    assert "wal_level=logical" in dockerfile
    assert service["environment"]["POSTGRES_DB"] == "secmaster"


def test_postgres_loads_schema_on_first_start():
    mounts = SERVICES["postgres"]["volumes"]
    schema_mounts = [mount for mount in mounts if mount.startswith("./ssmd/sql/schema.sql:")]

    assert len(schema_mounts) == 1
    assert ":/docker-entrypoint-initdb.d/" in schema_mounts[0]
    assert (ROOT / "ssmd/sql/schema.sql").exists()


def test_nats_runs_jetstream():
    service = SERVICES["nats"]

    assert service["image"].startswith("nats:")
    assert "-js" in service["command"]
    assert "-sd" in service["command"]


def test_redis_runs_without_persistence():
    command = SERVICES["redis"]["command"]

    assert SERVICES["redis"]["image"].startswith("redis:7")
    assert command[command.index("--save") + 1] == ""
    assert command[command.index("--appendonly") + 1] == "no"


def test_ports_published_on_loopback_only():
    for name, service in SERVICES.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


@pytest.mark.parametrize("service_name", sorted(DAEMONS))
def test_daemon_command_is_cli_subcommand(service_name):
    service = SERVICES[service_name]
    subcommand = DAEMONS[service_name]

    assert service["command"] == ["ssmd", subcommand]
    assert subcommand in {name for name, _, _ in cli.SUBCOMMANDS}
    assert service["build"]["dockerfile"] == "docker/ssmd.Dockerfile"


@pytest.mark.parametrize("service_name", sorted(DAEMONS))
def test_daemon_env_names_match_cli(service_name):
    environment = SERVICES[service_name]["environment"]
    accepted = _env_names_in_help(DAEMONS[service_name])

    assert config.DATABASE_URL.env in accepted
    assert set(environment) <= accepted, f"names ssmd {DAEMONS[service_name]} does not read: {set(environment) - accepted}"
    assert config.DATABASE_URL.env in environment
    assert config.NATS_URL.env in environment


def test_cache_reads_redis_url():
    assert config.REDIS_URL.env in SERVICES["ssmd-cache"]["environment"]


def test_daemons_agree_on_stream_and_tables():
    cdc = SERVICES["ssmd-cdc"]["environment"]
    cache = SERVICES["ssmd-cache"]["environment"]

    for name in (config.NATS_STREAM.env, config.CDC_TABLES.env, config.DATABASE_URL.env, config.NATS_URL.env):
        assert cdc[name] == cache[name], name
    config.parse_tables(cdc[config.CDC_TABLES.env])


@pytest.mark.parametrize("service_name", sorted(DAEMONS))
def test_daemon_urls_name_compose_services(service_name):
    service = SERVICES[service_name]
    environment = service["environment"]
    depends_on = set(service["depends_on"])
    expected_hosts = {config.DATABASE_URL.env: "postgres", config.NATS_URL.env: "nats", config.REDIS_URL.env: "redis"}

    for name, host in expected_hosts.items():
        if name not in environment:
            continue
        url = urlsplit(_interpolate(environment[name]))
        assert url.hostname == host, f"{name} points at {url.hostname}"
        assert host in depends_on, f"{service_name} does not depend on {host}"


def test_database_url_matches_postgres_service():
    url = urlsplit(_interpolate(SERVICES["ssmd-cdc"]["environment"][config.DATABASE_URL.env]))
    postgres = SERVICES["postgres"]["environment"]

    assert url.path == "/" + postgres["POSTGRES_DB"]
    assert url.password == _interpolate(postgres["POSTGRES_PASSWORD"])
    assert url.port == 5432


def test_ssmd_image_installs_package():
    dockerfile = (ROOT / "docker/ssmd.Dockerfile").read_text()

    assert re.search(r"^FROM python:3\.11", dockerfile, re.MULTILINE)
    assert "COPY ssmd ./ssmd" in dockerfile
    assert "pip install --no-cache-dir ." in dockerfile
    assert re.search(r"^USER (?!root)", dockerfile, re.MULTILINE)
