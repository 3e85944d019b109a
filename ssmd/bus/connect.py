"""NATS connections with authentication and TLS options, errors turned into ssmd errors."""

from __future__ import annotations

import argparse
import logging
import os
import ssl
from dataclasses import dataclass

import nats
from nats.aio.client import Client
from nats.errors import NoServersError

from ssmd.config import redact_url
from ssmd.core.errors import ConfigError, DependencyError

log = logging.getLogger(__name__)

NATS_SCHEMES = ("nats", "tls", "ws", "wss")


@dataclass(frozen=True)
class NatsAuth:
    """Credentials and TLS files; any of them may be unset."""

    user: str | None = None
    password: str | None = None
    token: str | None = None
    credentials_file: str | None = None
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None


# NATS authentication and TLS options: (flag, environment name, help).
NATS_AUTH_OPTIONS = (
    ("--nats-user", "NATS_USER", "NATS user name"),
    ("--nats-password", "NATS_PASSWORD", "NATS password (prefer the environment: flags show in ps)"),
    ("--nats-token", "NATS_TOKEN", "NATS authentication token"),
    ("--nats-creds", "NATS_CREDS", "path of a NATS credentials (.creds) file"),
    ("--nats-tls-ca", "NATS_TLS_CA", "path of the CA certificate that signed the NATS server certificate"),
    ("--nats-tls-cert", "NATS_TLS_CERT", "path of the client certificate for NATS TLS"),
    ("--nats-tls-key", "NATS_TLS_KEY", "path of the client certificate's private key"),
)


def add_nats_auth_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the NATS authentication and TLS flags, each defaulting to its environment variable."""
    for flag, env, help_text in NATS_AUTH_OPTIONS:
        parser.add_argument(flag, default=os.environ.get(env), help=f"{help_text} (env {env}; default unset)")


def nats_auth_from_args(args: argparse.Namespace) -> NatsAuth:
    return NatsAuth(
        user=args.nats_user, password=args.nats_password, token=args.nats_token, credentials_file=args.nats_creds,
        tls_ca_file=args.nats_tls_ca, tls_cert_file=args.nats_tls_cert, tls_key_file=args.nats_tls_key,
    )


def check_files(auth: NatsAuth) -> None:
    """Raise ConfigError for a credentials or TLS file that cannot be read.

    nats-py reads a credentials file only when the server requests a signature, so a wrong
    path would otherwise go unnoticed until the server starts to require it.
    """
    named = (("NATS_CREDS", auth.credentials_file), ("NATS_TLS_CA", auth.tls_ca_file),
             ("NATS_TLS_CERT", auth.tls_cert_file), ("NATS_TLS_KEY", auth.tls_key_file))
    for setting, path in named:
        if path and not os.access(path, os.R_OK):
            raise ConfigError(f"{setting} file {path!r} does not exist or is not readable: fix the path")


def tls_context(auth: NatsAuth) -> ssl.SSLContext | None:
    if not (auth.tls_ca_file or auth.tls_cert_file):
        return None
    context = ssl.create_default_context(cafile=auth.tls_ca_file)
    if auth.tls_cert_file:
        context.load_cert_chain(auth.tls_cert_file, auth.tls_key_file)
    return context


async def connect_nats(url: str, *, name: str, auth: NatsAuth = NatsAuth(), connect_timeout: float = 5.0) -> Client:
    """Connect to NATS; keeps reconnecting after a successful first connection."""
    servers = [part.strip() for part in url.split(",") if part.strip()]
    if not servers:
        raise ConfigError(f"invalid NATS_URL {url!r}: expected e.g. nats://127.0.0.1:4222")
    for server in servers:
        scheme = server.split("://", 1)[0].lower() if "://" in server else ""
        if scheme not in NATS_SCHEMES:
            raise ConfigError(f"invalid NATS_URL {redact_url(server)!r}: use a nats://, tls://, ws:// or wss:// URL such as nats://127.0.0.1:4222")

    client: Client | None = None
    check_files(auth)
    auth_error: str | None = None
    tls_error: str | None = None
    last_error: str | None = None
    connected = False

    async def on_error(exc: Exception) -> None:
        nonlocal auth_error, tls_error, last_error
        last_error = str(exc).strip() or type(exc).__name__
        if "authorization" in last_error.lower() or "authentication" in last_error.lower():
            auth_error = last_error
        if isinstance(exc, ssl.SSLError):
            tls_error = last_error
        if connected:
            log.warning("nats connection error: %s", exc)

    async def on_disconnect() -> None:
        # nats-py also calls this while the client closes on purpose; only a lost connection is news.
        if connected and not client.is_closed:
            log.warning("nats disconnected from %s", redact_url(url))

    async def on_reconnect() -> None:
        log.info("nats reconnected to %s", redact_url(url))

    # The first connection gets two attempts per server, so a wrong URL or password fails at
    # start-up instead of retrying forever. After it succeeds, reconnects never give up.
    options = dict(
        servers=servers, name=name, connect_timeout=connect_timeout, allow_reconnect=True,
        max_reconnect_attempts=1, reconnect_time_wait=1, error_cb=on_error,
        disconnected_cb=on_disconnect, reconnected_cb=on_reconnect,
        user=auth.user, password=auth.password, token=auth.token,
        user_credentials=auth.credentials_file, tls=tls_context(auth),
    )
    try:
        client = await nats.connect(**{key: value for key, value in options.items() if value is not None})
    except NoServersError as exc:
        if auth_error is not None:
            raise ConfigError(f"NATS at {redact_url(url)} rejected the credentials ({auth_error}): check the user, password, token or credentials file") from exc
        if tls_error is not None:
            raise ConfigError(
                f"TLS handshake with NATS at {redact_url(url)} failed ({tls_error}): check NATS_TLS_CA (the CA of the server's "
                "certificate) and, when the server verifies clients, NATS_TLS_CERT and NATS_TLS_KEY (a certificate its CA signed)"
            ) from exc
        raise DependencyError(f"cannot connect to NATS at {redact_url(url)}: {last_error or exc}; check that nats-server runs there") from exc
    except (OSError, TimeoutError) as exc:
        raise DependencyError(f"cannot connect to NATS at {redact_url(url)}: {exc}") from exc
    except nats.errors.Error as exc:
        if "authorization" in str(exc).lower() or "authentication" in str(exc).lower():
            raise ConfigError(f"NATS at {redact_url(url)} rejected the credentials: check the user, password, token or credentials file") from exc
        raise DependencyError(f"cannot connect to NATS at {redact_url(url)}: {exc}") from exc
    client.options["max_reconnect_attempts"] = -1
    connected = True
    return client
