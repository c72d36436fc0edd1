"""The operator HTTP endpoints' guard (the worker's and the trainer's): where they may listen, who may call.

:func:`check_http_exposure` runs before an API listens; :func:`bearer_authorised` is the one token check.
"""

from __future__ import annotations

import hmac
import ipaddress

from lrustream.kernel.config import Config, ConfigError


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address; any other name (or "" = every interface) may reach the network."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_http_exposure(cfg: Config, port: int | None = None) -> str | None:
    """Before an HTTP API listens on ``http.host`` (port ``port``, default ``http.port``): None when it stays on
    loopback or ``http.token`` guards it; a warning line for the log when it is open by the operator's choice
    (``http.allow_open``); otherwise :class:`ConfigError`, so an unguarded API never starts by accident."""
    host, port = cfg.http.host, cfg.http.port if port is None else port
    if is_loopback(host) or cfg.http.token:
        return None
    if not cfg.http.allow_open:
        raise ConfigError(f"http.host={host} listens beyond loopback without http.token: set http.token "
                          "(LRUSTREAM_HTTP_TOKEN), listen on 127.0.0.1, or set http.allow_open=true to serve it open")
    return (f"HTTP API on {host}:{port} without http.token (http.allow_open=true): anyone who reaches this port "
            "can use it (the worker's POST /refresh included); set LRUSTREAM_HTTP_TOKEN or keep the port private")


def bearer_authorised(token: str | None, header: str | None) -> bool:
    """Whether an ``Authorization`` header carries ``Bearer <token>`` (compared in constant time); no token (or
    an empty one) guards nothing."""
    if not token:
        return True
    return hmac.compare_digest((header or "").encode(), f"Bearer {token}".encode())
