"""k3s join tokens, parsed by the rules of k3s `pkg/clientaccess/token.go` (parseToken, hashCA).

Below both `config` (which refuses a token k3s would refuse) and `cluster` (which writes it into
k3s's config and checks a served CA against it): this module imports neither.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass, field

from agent import const

# kubeadm's BootstrapTokenPattern, which parseToken tries before user:password.
_BOOTSTRAP_TOKEN = re.compile(r"[a-z0-9]{6}\.[a-z0-9]{16}")
_PEM_CERT = b"-----BEGIN CERTIFICATE-----"


class TokenError(ValueError):
    """A join token k3s would refuse; the message never contains the token."""


class CABundleError(ValueError):
    """A /cacerts bundle whose hash cannot be computed the way k3s does."""


@dataclass(frozen=True)
class Token:
    """A parsed k3s join token; repr and str never show the password."""

    ca_hash: str | None  # the 64 characters after K10 exactly as written, secure tokens only
    user: str | None  # None when the credentials carry no user name (bare password, ':pw')
    password: str = field(repr=False)  # for a bootstrap token: the whole `<id>.<secret>`
    bootstrap: bool = False  # kubeadm-style `<id>.<secret>`, sent as a bearer token

    def secure(self) -> bool:
        """True when the token pins the cluster CA (`K10<sha256>::...`)."""
        return self.ca_hash is not None

    def accepts_ca(self, cacerts_pem: bytes) -> bool:
        """Whether k3s would trust this CA bundle with this token (no hash: trusts any, as k3s)."""
        if self.ca_hash is None:
            return True
        try:
            served = ca_hash(cacerts_pem)
        except CABundleError:
            return False
        return hmac.compare_digest(self.ca_hash.encode(), served.encode())


def parse_token(text: str) -> Token:
    """Parse as k3s parseToken: `K10<hash>::<user>:<pw>`, a bare `<pw>`, `<id>.<secret>`."""
    if not text:
        raise TokenError("the k3s token is empty")
    prefix = const.K3S_K10_PREFIX
    if not text.startswith(prefix):
        # A bare password becomes K10:::<pw> (empty hash, empty user), a bootstrap token K10::<t>.
        text = prefix + ("::" if _BOOTSTRAP_TOKEN.fullmatch(text) else ":::") + text
    rest = text[len(prefix) :]
    digest = ""
    if "::" in rest:
        digest, rest = rest.split("::", 1)
        # Go measures the length in bytes.
        if digest and len(digest.encode("utf-8", "surrogatepass")) != const.K3S_CA_HASH_HEX:
            raise TokenError(
                f"the k3s token's CA hash is not {const.K3S_CA_HASH_HEX} characters long "
                "(expected K10<sha256 hex>::<user>:<password>)"
            )
    ca = digest or None
    if _BOOTSTRAP_TOKEN.fullmatch(rest):
        return Token(ca, None, rest, bootstrap=True)
    user, colon, password = rest.partition(":")
    if not colon or not password:
        raise TokenError(
            "the k3s token has no password "
            "(expected K10<sha256 hex>::<user>:<password> or a bare password)"
        )
    return Token(ca, user or None, password)


def format_token(cacerts_pem: bytes, password: str, user: str = "server") -> str:
    """The secure token k3s writes to server/token for this CA and password (FormatTokenBytes)."""
    return f"{const.K3S_K10_PREFIX}{ca_hash(cacerts_pem)}::{user}:{password}"


def pinned(text: str, ca_sha256: str) -> str:
    """The token as k3s should carry it to a server proven to serve the CA hashing to CA_SHA256:
    a short token gains the pin (`K10<ca>::server:<pw>`, the form k3s writes to server/token), so
    that k3s itself refuses any other CA; a secure token stays as written."""
    token = parse_token(text)
    if token.secure():
        return text
    prefix = f"{const.K3S_K10_PREFIX}{ca_sha256}::"
    if token.bootstrap:
        return prefix + token.password
    return f"{prefix}{token.user or 'server'}:{token.password}"


def ca_hash(cacerts_pem: bytes) -> str:
    """Lowercase sha256 hex of a one-certificate CA bundle, its bytes exactly as served.

    k3s hashes a single-certificate bundle as raw bytes (its self-signed cluster CA, the only
    kind sugarkube creates). For a bundle with intermediates it hashes the DER of the verified
    root, which needs an X.509 chain verifier this agent does not carry: CABundleError.
    """
    count = cacerts_pem.count(_PEM_CERT)
    if count == 0:
        raise CABundleError("the CA bundle holds no PEM certificate")
    if count > 1:
        raise CABundleError(
            f"the CA bundle holds {count} certificates (a custom CA chain); "
            "use a short token (password only) to join such a cluster"
        )
    return hashlib.sha256(cacerts_pem).hexdigest()
