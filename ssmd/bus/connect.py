"""NATS connections with authentication and TLS options, errors turned into ssmd errors."""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass

import nats
from nats.aio.client import Client
from nats.errors import NoServersError

from ssmd.config import redact_url
from ssmd.core.errors import ConfigError, DependencyError

log = logging.getLogger(__name__)


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

    async def on_error(exc: Exception) -> None:
        log.warning("nats connection error: %s", exc)

    async def on_disconnect() -> None:
        log.warning("nats disconnected from %s", redact_url(url))

    async def on_reconnect() -> None:
        log.info("nats reconnected to %s", redact_url(url))

    options = dict(
        servers=servers, name=name, connect_timeout=connect_timeout, allow_reconnect=True,
        max_reconnect_attempts=-1, reconnect_time_wait=1, error_cb=on_error,
        disconnected_cb=on_disconnect, reconnected_cb=on_reconnect,
        user=auth.user, password=auth.password, token=auth.token,
        user_credentials=auth.credentials_file, tls=tls_context(auth),
    )
    try:
        return await nats.connect(**{key: value for key, value in options.items() if value is not None})
    except NoServersError as exc:
        raise DependencyError(f"cannot connect to NATS at {redact_url(url)}: no server answered ({exc})") from exc
    except (OSError, TimeoutError) as exc:
        raise DependencyError(f"cannot connect to NATS at {redact_url(url)}: {exc}") from exc
    except nats.errors.Error as exc:
        if "authorization" in str(exc).lower() or "authentication" in str(exc).lower():
            raise ConfigError(f"NATS at {redact_url(url)} rejected the credentials: check the user, password, token or credentials file") from exc
        raise DependencyError(f"cannot connect to NATS at {redact_url(url)}: {exc}") from exc
