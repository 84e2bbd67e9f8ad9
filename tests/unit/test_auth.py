"""Authenticated adverts (issue 12): the MAC, its key, the peer table's judgement, the token
pinned to the proven CA, and a refused but authenticated server that keeps blocking a bootstrap."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent import tokens
from agent.cluster import k3s
from agent.cluster.peers import PeerTable
from agent.config import load_settings
from agent.daemon.release import unpinned_ca
from agent.mdns import auth
from agent.mdns.auth import AdvertKey, boot_nonce, boot_order
from agent.mdns.records import Advert, Role, ServiceRecord, encode_txt

NAME = "k3s-sugar-dev@node1.local (server)"
KEY = AdvertKey.derive("s3cret", "sugar", "dev")
CA = "c" * 64


def txt(key: str = "00000000000000aa", boot: str = "0000000100000000", **extra: str) -> list[bytes]:
    advert = Advert(cluster="sugar", env="dev", role=Role.SERVER, phase="serving",
                    host="node1.local", key=key, boot=boot, ca=CA, **extra)  # type: ignore[arg-type]
    return encode_txt(advert)


def signed(name: str = NAME, port: int = 6443, **kw: str) -> tuple[bytes, ...]:
    return tuple(KEY.sign(name, port, txt(**kw)))


def test_hkdf_matches_rfc_5869_test_case_1() -> None:
    okm = auth._hkdf_sha256(b"\x0b" * 22, bytes(range(13)), bytes(range(0xF0, 0xFA)), 42)
    assert okm.hex() == (
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )


def test_a_signed_advert_verifies_and_the_mac_comes_last() -> None:
    items = signed()
    assert items[-1].startswith(b"mac=") and len(items[-1]) == 4 + auth.MAC_HEX
    assert KEY.verify(NAME, 6443, items) is None
    # Avahi renamed the instance after a name conflict: the name the node chose is covered.
    assert KEY.verify(NAME + " #2", 6443, items) is None


@pytest.mark.parametrize("tamper", [
    lambda items: (items[0] + b"x", *items[1:]),  # any item changed
    lambda items: items[:-2] + items[-1:],  # one dropped
    lambda items: (*items[:-1], b"role=agent", items[-1]),  # one added before the MAC
    lambda items: (*items, b"role=agent"),  # the MAC not last
    lambda items: items[:-1],  # no MAC
    lambda items: (*items[:-1], b"mac=" + b"0" * auth.MAC_HEX),  # a MAC made up
    lambda items: (),
])  # fmt: skip
def test_any_change_to_the_txt_fails(tamper: object) -> None:
    assert KEY.verify(NAME, 6443, tamper(signed())) == "unauthenticated"  # type: ignore[operator]


def test_the_name_port_token_and_cluster_are_covered() -> None:
    items = signed()
    assert KEY.verify(NAME.replace("(server)", "(agent)"), 6443, items) == "unauthenticated"
    assert KEY.verify(NAME, 6444, items) == "unauthenticated"
    for other in (AdvertKey.derive("other", "sugar", "dev"), AdvertKey.derive("s3cret", "sugar",
                  "prod"), AdvertKey.derive("s3cret", "salt", "dev")):  # fmt: skip
        assert other.verify(NAME, 6443, items) == "unauthenticated"


def test_a_k10_token_and_its_bare_password_make_one_key() -> None:
    k10 = tokens.parse_token(f"K10{CA}::server:s3cret")
    assert AdvertKey.derive(k10.password, "Sugar", "DEV") == KEY
    assert "s3cret" not in repr(KEY) and KEY.secret != b"s3cret"


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_a_later_start_compares_higher(first: int, later: int) -> None:
    a, b = boot_nonce(first, "12345678"), boot_nonce(later, "abcdef01")
    assert len(a) == auth.BOOT_HEX and (boot_order(a) < boot_order(b)) == (first < later)
    assert boot_order("") == -1


# --- the peer table judges -----------------------------------------------------------------------


def record(items: tuple[bytes, ...], name: str = NAME) -> ServiceRecord:
    return ServiceRecord(name=name, stype="_k3s-sugar-dev._tcp", domain="local",
                         host="node1.local", address="10.0.0.1", port=6443, txt=items)


def test_without_a_valid_mac_an_advert_is_ignored_once_with_the_reason() -> None:
    table = PeerTable("sugar", "dev", KEY)
    forged = AdvertKey.derive("guess", "sugar", "dev").sign(NAME, 6443, txt())
    change = table.seen(record(tuple(forged)))
    assert change is not None and (change.kind, change.reason) == ("ignored", "unauthenticated")
    assert table.seen(record(tuple(forged))) is None  # said once
    assert table.seen(record(tuple(txt()))) is None  # unsigned: the same reason, said already
    assert table.peers == []
    change = table.seen(record(signed()))
    assert change is not None and change.kind == "added"


def test_a_replay_of_an_older_start_is_ignored_a_newer_start_taken() -> None:
    table = PeerTable("sugar", "dev", KEY)
    assert table.seen(record(signed(boot=boot_nonce(2, "aaaaaaaa")))) is not None
    old = table.seen(record(signed(boot=boot_nonce(1, "bbbbbbbb"))))
    assert old is not None and (old.kind, old.reason) == ("ignored", "replayed")
    assert [p.advert.boot for p in table.peers] == [boot_nonce(2, "aaaaaaaa")]  # kept as it was
    newer = table.seen(record(signed(boot=boot_nonce(3, "cccccccc"))))
    assert newer is not None and newer.kind == "updated"


def test_without_a_token_nothing_is_judged() -> None:
    table = PeerTable("sugar", "dev")
    change = table.seen(record(tuple(txt())))
    assert change is not None and change.kind == "added"


# --- the token goes only to the proven CA ---------------------------------------------------------


@pytest.mark.parametrize(("given_token", "written"), [
    ("s3cret", f"K10{CA}::server:s3cret"),
    ("node:s3cret", f"K10{CA}::server:node:s3cret"),  # a short token is all password
    ("abcdef.0123456789abcdef", f"K10{CA}::abcdef.0123456789abcdef"),
    (f"K10{'d' * 64}::server:s3cret", f"K10{'d' * 64}::server:s3cret"),  # pinned already
])  # fmt: skip
def test_a_short_token_is_written_pinned_to_the_ca_the_proof_saw(
    given_token: str, written: str
) -> None:
    assert tokens.pinned(given_token, CA) == written
    assert tokens.parse_token(written).password == tokens.parse_token(given_token).password


# --- a K10 token pins a CA: no cluster-init without it (rule 9 of election.py) -------------------


def test_a_k10_token_whose_ca_is_not_on_disk_may_only_join(tmp_path: Path) -> None:
    pem = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    token = tokens.format_token(pem, "s3cret")
    settings = load_settings(environ={"SUGARKUBE_TOKEN": token}, root=tmp_path)
    assert "which no CA on this disk matches" in unpinned_ca(tmp_path, settings)
    ca = tmp_path / k3s.SERVER_CA.lstrip("/")
    ca.parent.mkdir(parents=True)
    ca.write_bytes(pem)  # the operator restored the cluster's CA: cluster-init may use it
    assert unpinned_ca(tmp_path, settings) == ""
    short = load_settings(environ={"SUGARKUBE_TOKEN": "s3cret"}, root=tmp_path)
    assert unpinned_ca(tmp_path / "empty", short) == ""
