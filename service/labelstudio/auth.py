"""Label Studio's API tokens, both kinds, as regcl presents them.

``REGCL_LABEL_STUDIO_API_KEY`` is told apart by its form:

- a **personal access token** (what new Label Studio organisations issue) is a JWT *refresh*
  token (three base64url parts, ``token_type: refresh``). It is never sent as such: it is
  exchanged at ``POST /api/token/refresh/`` for an access token (a JWT valid minutes), sent as
  ``Authorization: Bearer <access>``. The access token is refreshed
  ``label_studio_token_refresh_s`` before it expires (its lifetime, ``exp - iat``, is counted
  on this host's clock from when it arrived, so clock skew between the hosts does not matter)
  and once more when Label Studio answers 401 to it. One refresh at a time across threads: a
  thread that finds the token it used already replaced takes the new one without refreshing;
- anything else is a **legacy token**, sent as ``Authorization: Token <key>`` (Label Studio
  accepts it only where legacy tokens are enabled: ``--enable-legacy-api-token`` or the
  organisation's setting).

:class:`LabelStudioAuth` also remembers whether Label Studio accepted the token at the last
call (``/labelstudio/health`` shows it). No token ever reaches a log or an error message.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import threading
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import httpx

from regcl.errors import ConfigError
from service.labelstudio.errors import (
    LabelStudioTokenRefusedError,
    LabelStudioUnreachableError,
)

__all__ = ["REFRESH_PATH", "AuthStatus", "LabelStudioAuth", "TokenKind", "token_kind"]

logger = logging.getLogger(__name__)

REFRESH_PATH = "/api/token/refresh/"
_MAX_TOKEN_CHARS = 8192


class TokenKind(StrEnum):
    NONE = "none"
    LEGACY = "legacy-token"
    PERSONAL = "personal-access-token"


def _jwt_part(part: str) -> dict[str, Any] | None:
    try:
        raw = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
        value = json.loads(raw)
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def jwt_claims(token: str) -> dict[str, Any] | None:
    """The payload of a JWT (its signature is Label Studio's to check), or None when
    ``token`` is no JWT."""
    parts = token.split(".")
    if len(parts) != 3 or not all(parts[:2]):
        return None
    header = _jwt_part(parts[0])
    if header is None or "alg" not in header:
        return None
    return _jwt_part(parts[1])


def token_kind(key: str) -> TokenKind:
    """The kind of ``key`` by its form; ConfigError for a JWT that is not a refresh token
    (an access token would stop working within minutes)."""
    if not key:
        return TokenKind.NONE
    if len(key) > _MAX_TOKEN_CHARS or any(c.isspace() for c in key):
        raise ConfigError("REGCL_LABEL_STUDIO_API_KEY is not a Label Studio token (too long, or "
                          "it holds white space)")
    claims = jwt_claims(key)
    if claims is None:
        return TokenKind.LEGACY
    if claims.get("token_type") != "refresh":
        raise ConfigError("REGCL_LABEL_STUDIO_API_KEY is a JWT but not a personal access token "
                          f"(token_type {claims.get('token_type')!r}, expected 'refresh'): give "
                          "the personal access token from Account & Settings, not an access "
                          "token made from it")
    return TokenKind.PERSONAL


@dataclass(frozen=True)
class AuthStatus:
    """What ``/labelstudio/health`` shows: the token's kind, whether Label Studio accepted it
    at the last call (None: no call yet), when, access-token refreshes so far, and the
    problem of the last refusal."""

    kind: TokenKind
    accepted: bool | None
    checked_at: float | None
    refreshes: int
    problem: str | None


class LabelStudioAuth:
    """The ``Authorization`` header for Label Studio (see the module doc). ``refresh_s``:
    refresh this long before the access token expires."""

    def __init__(self, key: str, origin_url: str | None, refresh_s: float) -> None:
        self.kind = token_kind(key)
        self._key = key
        self._refresh_url = None if origin_url is None else origin_url + REFRESH_PATH
        self.refresh_s = refresh_s
        self._lock = threading.Lock()  # held while refreshing: one refresh at a time
        self._access: str | None = None
        self._renew_at = 0.0  # time.monotonic() past which the access token is refreshed
        self._refreshes = 0
        self._accepted: bool | None = None
        self._checked_at: float | None = None
        self._problem: str | None = None

    # -- the header -------------------------------------------------------------------------

    def header(self, client: httpx.Client, timeout: float) -> dict[str, str]:
        """``{"Authorization": ...}`` for a request to Label Studio (empty without a key);
        a personal access token is exchanged or refreshed first when needed."""
        if self.kind is TokenKind.NONE:
            return {}
        if self.kind is TokenKind.LEGACY:
            return {"Authorization": f"Token {self._key}"}
        access = self._access
        if access is None or time.monotonic() >= self._renew_at:
            access = self._refresh(client, timeout, stale=access)
        return {"Authorization": f"Bearer {access}"}

    def retry_after_refusal(self, sent: dict[str, str], client: httpx.Client,
                            timeout: float) -> dict[str, str] | None:
        """Label Studio answered 401 to ``sent``: the header to try once more with (a
        refreshed access token), or None when another try cannot help (a legacy token, no
        token). Records the refusal either way."""
        if self.kind is not TokenKind.PERSONAL:
            self.refused("Label Studio refused the legacy token (401): is it this Label "
                         "Studio's, and are legacy tokens enabled for its organisation?")
            return None
        used = sent.get("Authorization", "").removeprefix("Bearer ")
        access = self._refresh(client, timeout, stale=used or None)
        return {"Authorization": f"Bearer {access}"}

    def _refresh(self, client: httpx.Client, timeout: float, stale: str | None) -> str:
        """A fresh access token: made here unless another thread replaced ``stale`` (the token
        the caller had) while this one waited for the lock."""
        with self._lock:
            if self._access is not None and self._access != stale \
                    and time.monotonic() < self._renew_at:
                return self._access
            if self._refresh_url is None:
                raise LabelStudioUnreachableError("REGCL_LABEL_STUDIO_URL is not set: there is "
                                                  "no Label Studio to exchange the token with")
            try:
                resp = client.post(self._refresh_url, json={"refresh": self._key},
                                   timeout=httpx.Timeout(timeout))
            except httpx.TransportError as exc:
                raise LabelStudioUnreachableError(
                    f"Label Studio did not answer the token refresh ({REFRESH_PATH}): "
                    f"{type(exc).__name__}") from None
            if resp.status_code in (400, 401, 403):
                self.refused(f"Label Studio refused the personal access token at {REFRESH_PATH} "
                             f"({resp.status_code}): it was revoked, has expired, or belongs "
                             "to another Label Studio")
                raise LabelStudioTokenRefusedError(self._problem or "")
            if resp.status_code != 200:
                raise LabelStudioUnreachableError(f"Label Studio answered {resp.status_code} to "
                                                  f"the token refresh ({REFRESH_PATH})")
            try:
                access = resp.json()["access"]
            except (ValueError, KeyError, TypeError):
                access = None
            claims = jwt_claims(access) if isinstance(access, str) else None
            if claims is None:
                raise LabelStudioUnreachableError(f"Label Studio's answer to {REFRESH_PATH} "
                                                  "holds no access token")
            lifetime = _lifetime(claims)
            self._access = access
            self._renew_at = time.monotonic() + max(lifetime - self.refresh_s, 0.0)
            self._refreshes += 1
            logger.info("Label Studio access token refreshed (%d so far; valid %.0f s, renewed "
                        "%.0f s before it expires)", self._refreshes, lifetime, self.refresh_s)
            return access

    # -- what Label Studio said -------------------------------------------------------------

    def accepted(self) -> None:
        """Label Studio answered a call made with the token (not 401)."""
        self._accepted, self._checked_at, self._problem = True, time.time(), None

    def refused(self, problem: str) -> None:
        """Label Studio refused the token; ``problem`` says what to do about it."""
        if self._accepted is not False:
            logger.warning("%s", problem)
        self._accepted, self._checked_at, self._problem = False, time.time(), problem

    def status(self) -> AuthStatus:
        return AuthStatus(self.kind, self._accepted, self._checked_at, self._refreshes,
                          self._problem)


def _lifetime(claims: dict[str, Any]) -> float:
    """Seconds an access token is valid for, by Label Studio's own clock (``exp - iat``);
    60 s when it does not say."""
    exp, iat = claims.get("exp"), claims.get("iat")
    if isinstance(exp, int | float) and isinstance(iat, int | float) and exp > iat:
        return float(exp - iat)
    return 60.0
