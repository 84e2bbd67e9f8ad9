"""k3s join tokens: parsed as k3s parses them, never shown, and the CA hash a secure one pins."""

import contextlib
import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.tokens import CABundleError, Token, TokenError, ca_hash, format_token, parse_token

# A self-signed EC cluster CA, as k3s makes one (CN k3s-server-ca@<unix time>).
CA_PEM = b"""-----BEGIN CERTIFICATE-----
MIIBmzCCAUGgAwIBAgIUHNm2a5LuYEO8mJ9NsCF4q9D+fLIwCgYIKoZIzj0EAwIw
IzEhMB8GA1UEAwwYazNzLXNlcnZlci1jYUAxNzAwMDAwMDAwMB4XDTI2MTEyNzA2
NDgxOFoXDTM2MTEyNDA2NDgxOFowIzEhMB8GA1UEAwwYazNzLXNlcnZlci1jYUAx
NzAwMDAwMDAwMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEiTfrcB3TC46MftA2
jb2pbiXJCo6ozBTBZWCuCBemWH0J8w3g4BDhlS1CH9s6ur2tOxAiPuBqCY36oudg
82A2iKNTMFEwHQYDVR0OBBYEFDQhNroR915KUVGE4/ynvSlVbuDeMB8GA1UdIwQY
MBaAFDQhNroR915KUVGE4/ynvSlVbuDeMA8GA1UdEwEB/wQFMAMBAf8wCgYIKoZI
zj0EAwIDSAAwRQIhAK4aYxAyDKSXk7WZPKBIFSNx1aRYGIG5HEpK0I3+LbxiAiAB
6a3juLOJFxiv9jXbBq+ypmfK0bEbazdptUWCbuC6Sw==
-----END CERTIFICATE-----
"""
CA_SHA = hashlib.sha256(CA_PEM).hexdigest()
PASSWORD = "s3cret-Pa55word-XYZ"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"K10{CA_SHA}::server:{PASSWORD}", Token(CA_SHA, "server", PASSWORD)),
        (f"K10{CA_SHA}::node:{PASSWORD}", Token(CA_SHA, "node", PASSWORD)),
        (f"K10{CA_SHA}:::{PASSWORD}", Token(CA_SHA, None, PASSWORD)),
        (f"K10{CA_SHA}::server:a::b:c", Token(CA_SHA, "server", "a::b:c")),
        (PASSWORD, Token(None, None, PASSWORD)),
        # Without K10, k3s prefixes `K10:::`: everything is the password, colons included.
        ("user:pw", Token(None, None, "user:pw")),
        ("a::b", Token(None, None, "a::b")),
        (":pw", Token(None, None, ":pw")),
        # With K10 but no `::`, the rest is `<user>:<password>` and there is no hash.
        ("K10user:pw", Token(None, "user", "pw")),
        (f"K10::server:{PASSWORD}", Token(None, "server", PASSWORD)),
        ("abcdef.0123456789abcdef", Token(None, None, "abcdef.0123456789abcdef", bootstrap=True)),
        (
            f"K10{CA_SHA}::abcdef.0123456789abcdef",
            Token(CA_SHA, None, "abcdef.0123456789abcdef", bootstrap=True),
        ),
        # Not a bootstrap token (upper case): a bare password.
        ("ABCDEF.0123456789abcdef", Token(None, None, "ABCDEF.0123456789abcdef")),
        # k3s compares the hash as written: an upper-case hash parses, and never matches.
        (f"K10{CA_SHA.upper()}::server:pw", Token(CA_SHA.upper(), "server", "pw")),
    ],
)
def test_parse_token_follows_k3s(text: str, expected: Token) -> None:
    assert parse_token(text) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        ("K10", "no password"),
        ("K10::", "no password"),
        ("K10::pw", "no password"),
        ("K10secret", "no password"),
        (f"K10{CA_SHA}::server:", "no password"),
        (f"K10{CA_SHA}::server", "no password"),
        (f"K10{CA_SHA[:-1]}::server:pw", "64 characters"),
        (f"K10{CA_SHA}0::server:pw", "64 characters"),
    ],
)
def test_parse_token_refuses_what_k3s_refuses(text: str, reason: str) -> None:
    with pytest.raises(TokenError, match=reason) as caught:
        parse_token(text)
    assert isinstance(caught.value, ValueError)
    if len(text) > len("K10::"):
        assert text not in str(caught.value)


def test_token_never_shows_its_password() -> None:
    token = parse_token(f"K10{CA_SHA}::server:{PASSWORD}")
    assert PASSWORD not in repr(token)
    assert PASSWORD not in str(token)
    assert "server" in repr(token)


def test_token_secure_only_with_a_hash() -> None:
    assert parse_token(f"K10{CA_SHA}::server:pw").secure()
    assert not parse_token("pw").secure()
    assert not parse_token("K10::server:pw").secure()


_TOKEN_PARTS = st.tuples(
    st.sampled_from(["", "K10", f"K10{CA_SHA}", "K10abc", f"K10{CA_SHA}0"]),
    st.sampled_from(["", ":", "::", ":::"]),
    st.text(),
)


@given(_TOKEN_PARTS)
def test_parse_token_raises_only_token_error_without_the_text(parts: tuple[str, str, str]) -> None:
    text = "".join(parts)
    try:
        token = parse_token(text)
    except TokenError as err:
        message = str(err)
        assert "\n" not in message
        # Messages are fixed sentences; anything longer than a word of them is never echoed.
        if len(text) >= 12:
            assert text not in message
        if len(parts[2]) >= 12:
            assert parts[2] not in message
    else:
        assert token.password
        if len(token.password) >= 12:
            assert token.password not in repr(token)


@given(st.text())
def test_parse_token_on_any_text(text: str) -> None:
    with contextlib.suppress(TokenError):
        assert parse_token(text).password


@given(st.text(min_size=1), st.text(alphabet="abcdefghijklmnopqrstuvwxyz", max_size=8))
def test_secure_token_round_trips_any_password(password: str, user: str) -> None:
    token = parse_token(f"K10{CA_SHA}::{user}:{password}")
    assert (token.ca_hash, token.user, token.password) == (CA_SHA, user or None, password)


def test_ca_hash_is_sha256_of_the_served_bytes() -> None:
    assert ca_hash(CA_PEM) == CA_SHA
    # Exactly the bytes: a missing trailing newline is another hash, as in k3s.
    assert ca_hash(CA_PEM.rstrip(b"\n")) != CA_SHA


@pytest.mark.parametrize(("bundle", "reason"), [(b"", "no PEM"), (CA_PEM * 2, "2 certificates")])
def test_ca_hash_refuses_what_it_cannot_hash_as_k3s(bundle: bytes, reason: str) -> None:
    with pytest.raises(CABundleError, match=reason):
        ca_hash(bundle)


def test_token_accepts_only_its_ca() -> None:
    token = parse_token(format_token(CA_PEM, PASSWORD))
    assert token == Token(CA_SHA, "server", PASSWORD)
    assert token.accepts_ca(CA_PEM)
    assert not token.accepts_ca(CA_PEM.replace(b"MIIB", b"MIIC", 1))
    assert not token.accepts_ca(b"not a certificate")
    assert not parse_token(f"K10{CA_SHA.upper()}::server:pw").accepts_ca(CA_PEM)
    assert parse_token(PASSWORD).accepts_ca(b"anything at all")
