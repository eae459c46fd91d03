"""regcl's connection to Label Studio: its origin with the API token, and the storage hosts
without it.

- :meth:`LabelStudioConnection.origin_get`: a GET inside ``REGCL_LABEL_STUDIO_URL``'s origin
  with the token (:mod:`.auth`: ``Token`` or ``Bearer``); a 401 (or Label Studio's redirect
  to its login page, what its non-API views answer) gets one more try with a refreshed
  access token, then :class:`LabelStudioTokenRefusedError`;
- :meth:`LabelStudioConnection.get_json`: the same for Label Studio's JSON API (the sync);
- :meth:`LabelStudioConnection.storage_get`: a GET on a storage host that
  ``REGCL_LABEL_STUDIO_STORAGE_HOSTS`` lists (:mod:`.storage_hosts`), to the address that was
  checked, with no token and no cookie.

Neither client keeps cookies (Label Studio's session cookies never travel anywhere, not even
back to it), trusts proxy variables, or follows redirects by itself.
"""

from __future__ import annotations

import contextlib
import http.cookiejar
import logging
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from infra.settings import Settings
from service.labelstudio.auth import LabelStudioAuth, token_kind
from service.labelstudio.errors import (
    LabelStudioNotConfiguredError,
    LabelStudioNotFoundError,
    LabelStudioTokenRefusedError,
    LabelStudioUnreachableError,
)
from service.labelstudio.origin import Origin, label_studio_origin
from service.labelstudio.storage_hosts import (
    Resolver,
    StorageHosts,
    parse_storage_hosts,
    system_resolver,
)

__all__ = ["LabelStudioConnection", "check_settings", "shown"]

logger = logging.getLogger(__name__)

MAX_JSON_BYTES = 64 * 2**20


def _no_cookies() -> http.cookiejar.CookieJar:
    return http.cookiejar.CookieJar(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))


def check_settings(settings: Settings) -> None:
    """ConfigError naming the setting when the Label Studio URL, token or storage hosts are
    malformed (the API checks them as it starts)."""
    label_studio_origin(settings.label_studio_url)
    token_kind(settings.label_studio_api_key.get_secret_value())
    parse_storage_hosts(settings.label_studio_storage_hosts)


def shown(url: str) -> str:
    """A URL for a message: at most 200 characters, no query (it may hold a signature)."""
    text = url.split("?", 1)[0]
    return repr(text if len(text) <= 200 else text[:200] + "...")


class LabelStudioConnection:
    """The configured Label Studio and storage hosts (see the module doc). ``transport``
    and ``resolver`` are for tests."""

    def __init__(self, settings: Settings, transport: httpx.BaseTransport | None = None,
                 resolver: Resolver = system_resolver) -> None:
        self.origin: Origin | None = label_studio_origin(settings.label_studio_url)
        self.auth = LabelStudioAuth(settings.label_studio_api_key.get_secret_value(),
                                    None if self.origin is None else self.origin.url,
                                    settings.label_studio_token_refresh_s)
        self.storage = StorageHosts.from_setting(settings.label_studio_storage_hosts, resolver)
        self.timeout_s = settings.label_studio_fetch_timeout_s
        options: dict[str, Any] = {"headers": {"Accept-Encoding": "identity"},
                                   "follow_redirects": False, "transport": transport,
                                   "trust_env": False}
        self._client = httpx.Client(cookies=_no_cookies(), **options)
        self._storage_client = httpx.Client(cookies=_no_cookies(), **options)

    def close(self) -> None:
        self._client.close()
        self._storage_client.close()

    def require_origin(self) -> Origin:
        if self.origin is None:
            raise LabelStudioNotConfiguredError(
                "REGCL_LABEL_STUDIO_URL is not set: this service talks to that Label Studio "
                "only")
        return self.origin

    def _is_login_redirect(self, resp: httpx.Response) -> bool:
        if not resp.is_redirect or self.origin is None:
            return False
        target = self.origin.resolve(str(resp.url.join(resp.headers.get("location", ""))))
        return target is not None and urlsplit(target).path.startswith(
            self.origin.base_path + "/user/login")

    @contextlib.contextmanager
    def origin_get(self, url: str, timeout: float, params: dict[str, Any] | None = None
                   ) -> Iterator[httpx.Response]:
        """A streamed, authenticated GET of ``url`` (inside the origin: the caller checked)."""
        header = self.auth.header(self._client, timeout)
        for attempt in range(2):
            with self._client.stream("GET", url, params=params, headers=header,
                                     timeout=httpx.Timeout(timeout)) as resp:
                if resp.status_code == 401 or self._is_login_redirect(resp):
                    if attempt == 0 and header:
                        retry = self.auth.retry_after_refusal(header, self._client, timeout)
                        if retry is not None:
                            header = retry
                            continue
                    if not header:
                        raise LabelStudioTokenRefusedError(
                            f"Label Studio wants a token for {shown(url)}: set "
                            "REGCL_LABEL_STUDIO_API_KEY")
                    if attempt == 1:
                        self.auth.refused("Label Studio refused regcl's access token (401) "
                                          "even right after a refresh")
                    raise LabelStudioTokenRefusedError(
                        self.auth.status().problem or "Label Studio refused regcl's token")
                if header:
                    self.auth.accepted()
                yield resp
                return
        raise AssertionError("unreachable")  # pragma: no cover

    def get_json(self, path: str, params: dict[str, Any] | None = None) -> Any:
        """The JSON answer of Label Studio's API at ``path`` (200 only)."""
        origin = self.require_origin()
        url = origin.url + path
        try:
            with self.origin_get(url, self.timeout_s * 3, params) as resp:
                if resp.status_code in (403, 404):
                    raise LabelStudioNotFoundError(f"Label Studio answered {resp.status_code} "
                                                   f"for {path}: no such object, or the "
                                                   "token's user may not see it")
                if resp.status_code != 200:
                    raise LabelStudioUnreachableError(
                        f"Label Studio answered {resp.status_code} for {path}")
                body = bytearray()
                for chunk in resp.iter_bytes():
                    body += chunk
                    if len(body) > MAX_JSON_BYTES:
                        raise LabelStudioUnreachableError(f"Label Studio's answer for {path} "
                                                          f"is larger than {MAX_JSON_BYTES} bytes")
        except httpx.TransportError as exc:
            raise LabelStudioUnreachableError(f"Label Studio did not answer for {path}: "
                                              f"{type(exc).__name__}") from None
        try:
            return httpx.Response(200, content=bytes(body)).json()
        except ValueError:
            raise LabelStudioUnreachableError(f"Label Studio's answer for {path} is not "
                                              "JSON") from None

    @contextlib.contextmanager
    def storage_get(self, url: str, timeout: float) -> Iterator[httpx.Response]:
        """A streamed GET of ``url`` on a listed storage host, to its checked address, with
        no token and no cookie (StorageHostRefusedError when not listed or not allowed)."""
        entry = self.storage.entry_for(url)
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        port = parts.port or entry.port
        address = self.storage.address(entry, host, port)
        netloc = f"[{address}]" if ":" in address else address
        target = urlunsplit((parts.scheme, f"{netloc}:{port}", parts.path or "/", parts.query,
                             ""))
        # The Host header and the TLS server name stay the storage host's (a presigned URL
        # signs its Host); only the connection goes to the address checked above.
        headers = {"Host": parts.netloc.rsplit("@", 1)[-1]}
        extensions = {"sni_hostname": host} if parts.scheme == "https" else {}
        request = self._storage_client.build_request(
            "GET", target, headers=headers, timeout=httpx.Timeout(timeout),
            extensions=extensions)
        resp = self._storage_client.send(request, stream=True)
        try:
            yield resp
        finally:
            resp.close()
