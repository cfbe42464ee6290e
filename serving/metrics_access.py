"""Who may read /metrics, and on which listener (server.metrics; README, Metrics).

/metrics names tenants and their adapters in its labels. Open on the API port, it would
tell anyone who reaches the port which adapters exist, where the API answers another
tenant's adapter exactly like a missing one. So with auth enabled the gateway refuses to
start unless a bearer token or a separate listener protects /metrics (or it is off).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from serving.errors import Unauthorized
from tuneserve.config import Settings
from tuneserve.errors import ConfigError

log = logging.getLogger(__name__)

MIN_TOKEN_LENGTH = 16
TOKEN_MESSAGE = "Missing or incorrect metrics token: send Authorization: Bearer <server.metrics token>."
UNPROTECTED = (
    "server.metrics: auth.enabled is true, and /metrics (whose labels name tenants and "
    "their adapters) would be open on the API port: set server.metrics.token_file (or "
    "token) to require a bearer token, server.metrics.port to serve it on a separate "
    "listener, or server.metrics.enabled false"
)


def _checked(token: str, source: str) -> str:
    # Prometheus sends the token as one header value: it must survive that unchanged.
    if len(token) < MIN_TOKEN_LENGTH or not token.isascii() or len(token.split()) != 1:
        raise ConfigError(
            f"{source}: the metrics token must be at least {MIN_TOKEN_LENGTH} ASCII "
            "characters without spaces"
        )
    return token


def _digest(token: str) -> bytes:
    # Digests have one length, so compare_digest is constant-time and hides the token's length.
    return hashlib.sha256(token.encode()).digest()


def _read_token(path: Path) -> str:
    source = f"server.metrics.token_file ({path})"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
        raise ConfigError(f"{source}: cannot read it: {reason}") from exc
    return _checked(text.strip(), source)


class MetricsToken:
    """The bearer token of server.metrics.token or token_file, held only as a digest.

    A token file is read again when it changes, so rotating a mounted Secret needs no
    restart; a change that leaves it unreadable or too short keeps the previous token
    (with a warning) rather than locking Prometheus out or letting anyone in.
    """

    def __init__(self, token: str, path: Path | None = None) -> None:
        self._digest = _digest(token)
        self._path = path
        self._seen = self._signature()

    @classmethod
    def from_file(cls, path: Path) -> "MetricsToken":
        return cls(_read_token(path), path)

    def _signature(self) -> tuple[int, int, int] | None:
        if self._path is None:
            return None
        try:
            st = os.stat(self._path)  # follows the symlink Kubernetes swaps on rotation
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def _refresh(self) -> None:
        signature = self._signature()
        if signature == self._seen:
            return
        self._seen = signature  # one warning per change, not one per scrape
        assert self._path is not None
        try:
            self._digest = _digest(_read_token(self._path))
        except ConfigError as exc:
            log.warning("%s; /metrics keeps accepting the previous token", exc)

    def matches(self, presented: str) -> bool:
        self._refresh()
        return hmac.compare_digest(_digest(presented), self._digest)


def _presented_token(header: str | None) -> str | None:
    scheme, _, value = (header or "").strip().partition(" ")
    value = value.strip()
    return value if scheme.lower() == "bearer" and value else None


@dataclass(frozen=True)
class MetricsAccess:
    enabled: bool
    port: int | None  # a listener of its own; None: the API port
    host: str
    token: MetricsToken | None

    @classmethod
    def from_settings(cls, settings: Settings) -> "MetricsAccess":
        config = settings.server.metrics
        token = None
        if config.token is not None:
            token = MetricsToken(_checked(config.token.get_secret_value(), "server.metrics.token"))
        elif config.token_file is not None:
            token = MetricsToken.from_file(config.token_file)
        if settings.auth.enabled and config.enabled and config.port is None and token is None:
            raise ConfigError(UNPROTECTED)
        return cls(config.enabled, config.port, config.host or settings.server.host, token)

    @property
    def on_api_port(self) -> bool:
        return self.enabled and self.port is None

    @property
    def own_listener(self) -> bool:
        return self.enabled and self.port is not None

    def authorize(self, authorization_header: str | None) -> None:
        """Raises Unauthorized unless the header carries the token (when one is set)."""
        if self.token is None:
            return
        presented = _presented_token(authorization_header)
        if presented is None or not self.token.matches(presented):
            raise Unauthorized(TOKEN_MESSAGE)
