"""One HTTP(S) origin (scheme, host, port, base path) and whether a URL lies inside it.

Used for ``REGCL_LABEL_STUDIO_URL``: the service fetches task images from that Label Studio
only. A URL is inside the origin when, after resolving it against the origin (task data often
holds relative paths such as ``/data/upload/3/x.png``), it has the same scheme, the same host
(compared case-insensitively), the same effective port, no user information (``user@host``
tricks), and a path under the origin's base path. Anything else is refused before any
request is made.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from urllib.parse import SplitResult, urljoin, urlsplit, urlunsplit

from regcl.errors import ConfigError

__all__ = ["Origin", "label_studio_origin", "parse_origin"]

_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class Origin:
    """scheme (http/https), host (lower case), port (explicit or the scheme's default) and
    base path (no trailing slash; ``""`` for the root)."""

    scheme: str
    host: str
    port: int
    base_path: str

    @property
    def url(self) -> str:
        """The origin as a URL, without a trailing slash."""
        default = _DEFAULT_PORTS[self.scheme] == self.port
        netloc = _netloc(self.host) + ("" if default else f":{self.port}")
        return urlunsplit((self.scheme, netloc, self.base_path, "", ""))

    def resolve(self, url: str) -> str | None:
        """``url`` (absolute, or relative to the origin) as an absolute URL if it lies inside
        this origin, else None."""
        if not isinstance(url, str) or not url or len(url) > 8192 or _has_control(url):
            return None
        try:
            parts = urlsplit(urljoin(self.url + "/", url))
            port = parts.port
        except ValueError:  # a port that is no number, a bracket that does not close
            return None
        if parts.scheme != self.scheme or parts.username is not None \
                or parts.password is not None or "@" in parts.netloc:
            return None
        if (parts.hostname or "").lower() != self.host:
            return None
        if (port if port is not None else _DEFAULT_PORTS[parts.scheme]) != self.port:
            return None
        path = parts.path or "/"
        normal = posixpath.normpath(path)  # /data/../admin -> /admin: judged where it points
        if not (normal == self.base_path or normal.startswith(self.base_path + "/")):
            return None
        return urlunsplit(SplitResult(parts.scheme, parts.netloc, path, parts.query, ""))


def _netloc(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _has_control(text: str) -> bool:
    return any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)


def parse_origin(url: str) -> Origin:
    """The origin of ``url`` (``http(s)://host[:port][/base]``); ValueError for anything
    else: another scheme, no host, user information, a query or a fragment."""
    text = url.strip()
    if _has_control(text):
        raise ValueError("the URL holds control characters")
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"not a URL: {exc}") from None
    if parts.scheme not in _DEFAULT_PORTS:
        raise ValueError(f"must be an http:// or https:// URL, got {url!r}")
    if not parts.hostname:
        raise ValueError(f"has no host: {url!r}")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise ValueError("must not hold user information (user:password@); the API key "
                         "is a setting of its own")
    if parts.query or parts.fragment:
        raise ValueError(f"must not have a query or a fragment: {url!r}")
    base = posixpath.normpath(parts.path) if parts.path not in ("", "/") else ""
    return Origin(parts.scheme, parts.hostname.lower(),
                  port if port is not None else _DEFAULT_PORTS[parts.scheme],
                  "" if base == "/" else base)


def label_studio_origin(url: str) -> Origin | None:
    """The origin of ``REGCL_LABEL_STUDIO_URL`` (None when it is empty); ConfigError naming
    the setting when it is no origin. The API checks it as it starts."""
    if not url.strip():
        return None
    try:
        return parse_origin(url)
    except ValueError as exc:
        raise ConfigError(f"REGCL_LABEL_STUDIO_URL {exc}") from None
