"""The joining side of k3s's TLS bootstrap (pkg/clientaccess/token.go), blocking calls.

/cacerts is fetched without verification and its sha256 compared with a secure token's hash:
a mismatch is refused before any credential is sent. Then the server's certificate must verify
against that CA, and only then does the password travel (HTTP Basic, user `server` or `node`).
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from agent import tokens

from .const import BODY_MAX, CLIENT_TIMEOUT
from .events import Refused


def unverified() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def verified(ca_pem: bytes) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cadata=ca_pem.decode("ascii"))
    return context


def request(
    url: str,
    method: str,
    path: str,
    context: ssl.SSLContext,
    *,
    body: bytes | None = None,
    password: str | None = None,
    user: str = "server",
    timeout: float = CLIENT_TIMEOUT,
) -> tuple[int, bytes]:
    """One HTTPS request to URL's host and port; (status, body). OSError when unreachable."""
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise Refused("bad_url", f"only https:// server URLs are supported, not {url!r}")
    headers = {"Connection": "close"}
    if password is not None:
        credentials = base64.b64encode(f"{user}:{password}".encode()).decode()
        headers["Authorization"] = f"Basic {credentials}"
    if body is not None:
        headers["Content-Type"] = "application/json"
    connection = http.client.HTTPSConnection(
        unquote(parts.hostname), parts.port or 6443, context=context, timeout=timeout
    )
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read(BODY_MAX)
    except (http.client.HTTPException, ssl.SSLError) as exc:
        raise OSError(f"{type(exc).__name__}: {exc}") from exc
    finally:
        connection.close()


@dataclass(frozen=True)
class Trusted:
    """A server whose CA the token accepts and whose certificate verified against it."""

    url: str
    cacerts: bytes
    token: tokens.Token

    def call(
        self, path: str, payload: dict[str, Any], user: str, timeout: float = CLIENT_TIMEOUT
    ) -> dict[str, Any]:
        """POST PAYLOAD with the token's password; the JSON answer, or Refused with a reason.

        401 is `unauthorized`; a 409 or 503 carrying {"reason": ...} is refused for that reason
        (too_many_learners among them); anything else not 200 is `join_failed`.
        """
        try:
            status, answer = request(
                self.url, "POST", path, verified(self.cacerts), body=json.dumps(payload).encode(),
                password=self.token.password, user=self.token.user or user, timeout=timeout,
            )  # fmt: skip
        except OSError as exc:
            raise Refused("unreachable", f"{self.url} failed during the join: {exc}") from exc
        if status == 401:
            raise Refused("unauthorized", f"{self.url} refused the token's password")
        text = answer[:300].decode(errors="replace")
        if status != 200:
            reason = "join_failed"
            if status in (409, 503):
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    reason = str(json.loads(answer)["reason"])
            raise Refused(reason, f"{self.url}{path} answered {status}: {text}")
        try:
            reply: dict[str, Any] = json.loads(answer)
        except ValueError as exc:
            raise Refused("join_failed", f"{self.url}{path} answered no JSON: {text}") from exc
        if "ca_cert" in reply and reply["ca_cert"].encode() != self.cacerts:
            raise Refused("ca_invalid", f"{self.url} handed over another CA than it serves")
        return reply


def trust(url: str, token_text: str | None) -> Trusted:
    """URL's /cacerts pinned to the token's CA hash, then its certificate verified against it.

    Refused("unreachable") when URL does not answer (the caller decides whether to retry).
    """
    if token_text is None:
        raise Refused("no_token", "a token is required to join a server (k3s: --token)")
    token = tokens.parse_token(token_text)
    try:
        status, cacerts = request(url, "GET", "/cacerts", unverified())
    except OSError as exc:
        raise Refused("unreachable", f"{url} did not answer: {exc}") from exc
    if status != 200:
        raise Refused("no_cacerts", f"{url}/cacerts answered {status}")
    if not token.accepts_ca(cacerts):
        raise Refused("ca_mismatch", f"{url} serves a CA whose hash is not the token's")
    try:
        request(url, "GET", "/cacerts", verified(cacerts))
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise Refused("ca_invalid", f"{url}'s certificate does not verify with its CA") from exc
    return Trusted(url, cacerts, token)
