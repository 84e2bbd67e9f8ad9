"""TXT layout, names and tolerant parsing of agent.mdns.records."""

from dataclasses import replace

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from agent.mdns.records import (
    SCHEMA_VERSION,
    Advert,
    RecordError,
    Role,
    ServiceRecord,
    encode_txt,
    instance_name,
    normalize_host,
    parse_advert,
    parse_txt,
    service_type,
)

CA = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
BASE = [b"k3s=1", b"cluster=sugar", b"env=dev", b"role=server"]


def advert(*extra: bytes) -> Advert:
    """The advert read from the minimal valid TXT followed by extra items."""
    return parse_advert([*BASE, *extra])


def one_line(message: str) -> bool:
    return bool(message) and len(message.splitlines()) == 1


# --- strategies ---------------------------------------------------------------------------------

_VISIBLE = st.characters(blacklist_categories=("Cc", "Cf", "Zl", "Zp", "Cs"))


def _stable(text: str) -> bool:
    """Text that value cleaning leaves as it is: no surrounding whitespace or quotes."""
    quoted = len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'"
    return text == text.strip() and not quoted


values = st.text(_VISIBLE, max_size=30).filter(_stable)
lower_values = (
    st.text(_VISIBLE, min_size=1, max_size=30)
    .map(str.lower)
    .filter(lambda t: t and t == t.lower() and _stable(t))
)
labels = st.from_regex(r"[a-z0-9][a-z0-9-]{0,20}", fullmatch=True)
hosts = st.lists(labels, min_size=1, max_size=3).map(lambda ls: ".".join([*ls, "local"]))
ip6s = st.builds(
    lambda address, zone: f"{address}%{zone}" if zone else str(address),
    st.ip_addresses(v=6),
    st.one_of(st.just(""), st.from_regex(r"[a-z0-9]{1,15}", fullmatch=True)),
)
adverts = st.builds(
    Advert,
    cluster=lower_values,
    env=lower_values,
    role=st.sampled_from(Role),
    phase=values,
    host=st.one_of(st.just(""), hosts),
    leader=st.one_of(st.just(""), hosts),
    ip4=st.one_of(st.just(""), st.ip_addresses(v=4).map(str)),
    ip6=st.one_of(st.just(""), ip6s),
    key=st.one_of(st.just(""), st.from_regex(r"[0-9a-f]{16}", fullmatch=True)),
    vote=st.one_of(st.just(""), st.from_regex(r"[0-9a-f]{16}", fullmatch=True)),
    admit=st.one_of(st.just(""), st.from_regex(r"[0-9a-f]{16}", fullmatch=True)),
    boot=st.one_of(st.just(""), st.from_regex(r"[0-9a-f]{16}", fullmatch=True)),
    members=st.one_of(st.just(""), st.integers(0, 999).map(str)),
    servers=st.one_of(st.just(""), st.integers(0, 999).map(str)),
    ca=st.one_of(st.just(""), st.from_regex(r"[0-9a-f]{64}", fullmatch=True)),
    v=st.integers(min_value=1, max_value=999_999_999),
)
txt_keys = st.sampled_from(
    ["k3s", "cluster", "env", "role", "phase", "leader", "host", "ip4", "ip6", "v", "key", "ca",
     "vote", "admit", "members", "servers", "boot", "mac"]
)
near_valid_items = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda k, v: k.encode() + b"=" + v, txt_keys, st.binary(max_size=260)),
    st.builds(lambda k, v: k.encode() + b"=" + v.encode(), txt_keys, st.text(max_size=80)),
    st.sampled_from([*BASE, b"k3s=2", b"role=agent", b"role=bogus", b"", b"=", b"k3s"]),
)


# --- encoding -----------------------------------------------------------------------------------


def test_golden_layout() -> None:
    node = Advert(
        cluster="sugar", env="dev", role=Role.BOOTSTRAP, phase="electing", host="node1.local",
        leader="node2.local", ip4="192.168.50.11", ip6="fe80::1%eth0", key="00000000000042ab",
        ca=CA, vote="00000000000011aa", admit="00000000000077cc", members="3", servers="3",
        boot="0000000312345678",
    )
    assert encode_txt(node) == [
        b"k3s=1", b"cluster=sugar", b"env=dev", b"role=bootstrap", b"phase=electing",
        b"leader=node2.local", b"host=node1.local", b"ip4=192.168.50.11", b"ip6=fe80::1%eth0",
        b"v=1", b"key=00000000000042ab", b"ca=" + CA.encode(), b"vote=00000000000011aa",
        b"admit=00000000000077cc", b"members=3", b"servers=3", b"boot=0000000312345678",
    ]


def test_empty_values_keep_their_equals_sign() -> None:
    node = Advert(cluster="sugar", env="dev", role=Role.CANDIDATE, phase="", host="")
    assert encode_txt(node) == [
        b"k3s=1", b"cluster=sugar", b"env=dev", b"role=candidate", b"phase=", b"leader=",
        b"host=", b"ip4=", b"ip6=", b"v=1", b"key=", b"ca=", b"vote=",
        b"admit=", b"members=", b"servers=", b"boot=",
    ]


@given(adverts)
def test_round_trip(node: Advert) -> None:
    assert parse_advert(encode_txt(node)) == node


def test_encode_publishes_the_canonical_form() -> None:
    node = Advert(
        cluster="Sugar", env="DEV", role=Role.SERVER, phase="ready", host="Node1",
        leader="node2.local.local.", ip6="FE80:0:0::0001", ca=CA.upper(),
    )
    assert parse_advert(encode_txt(node)) == Advert(
        cluster="sugar", env="dev", role=Role.SERVER, phase="ready", host="node1.local",
        leader="node2.local", ip6="fe80::1", ca=CA,
    )


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"cluster": ""}, "no cluster"),
        ({"env": " "}, "env"),
        ({"phase": "x" * 250}, "over 255"),
        ({"phase": "a\nb"}, "control characters"),
        ({"key": '"quoted"'}, "key="),
        ({"phase": " padded"}, "phase="),
        ({"ip4": "10.0.0.256"}, "not an IPv4 address"),
        ({"ip6": "10.0.0.1"}, "not an IPv6 address"),
        ({"host": "a..b.local"}, "empty label"),
        ({"leader": "my node"}, "whitespace"),
        ({"ca": "abc"}, "sha256"),
        ({"members": "many"}, "count"),
        ({"members": "1000"}, "count"),
        ({"v": 0}, "positive integer"),
        ({"role": "captain"}, "unknown role"),
        ({"phase": "re\udcffady"}, "UTF-8"),  # a lone surrogate, as surrogateescape makes
    ],
)
def test_encode_refuses_what_would_not_read_back(change: dict[str, object], reason: str) -> None:
    node = Advert(cluster="sugar", env="dev", role=Role.SERVER, phase="ready", host="n1.local")
    with pytest.raises(RecordError, match=reason) as caught:
        encode_txt(replace(node, **change))
    assert one_line(str(caught.value))


# --- parsing: tolerance, rule by rule ------------------------------------------------------------


def test_keys_and_names_are_case_insensitive() -> None:
    got = parse_advert([b"K3S=1", b"Cluster=SUGAR", b"ENV=Dev", b"Role=Server", b"HOST=Node1"])
    assert (got.cluster, got.env, got.role) == ("sugar", "dev", Role.SERVER)
    assert got.host == "node1.local"


def test_agent_role_is_accepted() -> None:
    assert parse_advert([*BASE[:3], b"role=AGENT"]).role is Role.AGENT


@pytest.mark.parametrize(
    ("raw", "host"),
    [
        (b"node1", "node1.local"),
        (b"node1.local.", "node1.local"),
        (b"node1.local...", "node1.local"),
        (b"node1.local.local", "node1.local"),
        (b"NODE1.Local.LOCAL.local.", "node1.local"),
        (b"node1.example.com", "node1.example.com"),
        (b"\tnode1.local\r\n", "node1.local"),
        (b"node\x001.local", "node1.local"),
        (b"node1.local\xe2\x80\xae", "node1.local"),  # U+202E, a bidi override
        (b'"node1.local"', "node1.local"),
        (b"' node1.local '", "node1.local"),
        (b"", ""),
    ],
)
def test_host_and_leader_are_normalized(raw: bytes, host: str) -> None:
    got = advert(b"host=" + raw, b"leader=" + raw)
    assert (got.host, got.leader) == (host, host)


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        (b'"ready"', "ready"),
        (b"'ready'", "ready"),
        (b'""ready""', '"ready"'),  # one pair only
        (b"\"ready'", "\"ready'"),  # not a pair
        (b'"', '"'),
        (b"  ready \x7f", "ready"),
        (b"re\x1bady", "ready"),
        (b"a=b", "a=b"),  # only the first "=" separates (RFC 6763 §6.4)
    ],
)
def test_values_are_cleaned(raw: bytes, value: str) -> None:
    assert advert(b"phase=" + raw).phase == value


def test_control_characters_are_reported() -> None:
    values, problems = parse_txt([b"ph\x00ase=re\nady"])
    assert values == {"phase": "ready"}
    assert problems == ["item 0: control characters removed from 'phase'"]


@pytest.mark.parametrize("missing", ["k3s", "cluster", "env", "role"])
def test_required_keys(missing: str) -> None:
    items = [item for item in BASE if not item.startswith(missing.encode() + b"=")]
    with pytest.raises(RecordError, match=missing):
        parse_advert(items)
    with pytest.raises(RecordError, match=missing):
        parse_advert([*items, missing.encode() + b"="])
    with pytest.raises(RecordError, match=missing):
        parse_advert([*items, missing.encode()])


def test_optional_keys_default_when_missing() -> None:
    assert advert() == Advert(cluster="sugar", env="dev", role=Role.SERVER, phase="", host="")


@pytest.mark.parametrize(("item", "reason"), [(b"k3s=2", "expected k3s=1"), (b"role=boss", "role")])
def test_wrong_required_values(item: bytes, reason: str) -> None:
    key = item.split(b"=")[0]
    with pytest.raises(RecordError, match=reason):
        parse_advert([item, *(i for i in BASE if not i.startswith(key))])


def test_non_utf8_key_drops_the_item() -> None:
    values, problems = parse_txt([*BASE, b"ho\xffst=node1"])
    assert "host" not in values
    assert problems == ["item 4: key is not UTF-8, ignored"]


def test_non_utf8_value_spoils_host_and_addresses_only() -> None:
    values, problems = parse_txt(
        [b"host=node\xff1", b"leader=\xc3(", b"ip6=fe80::1%et\xffh0", b"phase=re\xffady"]
    )
    assert values == {"host": "", "leader": "", "ip6": "", "phase": "re\ufffdady"}
    assert sum("is not UTF-8" in p for p in problems) == 4
    assert sum("dropped" in p for p in problems) == 3


def test_item_size_limit() -> None:
    longest = b"phase=" + b"p" * (255 - len(b"phase="))
    assert len(longest) == 255
    assert advert(longest).phase == "p" * 249
    values, problems = parse_txt([longest + b"p"])
    assert values == {}
    assert problems == ["item 0: 256 bytes > 255 (RFC 6763 §6.1)"]


def test_items_without_equals_are_boolean_attributes() -> None:
    assert parse_txt([b"flag", b"phase"]) == ({"flag": "", "phase": ""}, [])


def test_items_starting_with_equals_are_ignored() -> None:
    values, problems = parse_txt([b"=phase=x", b"="])
    assert values == {}
    assert len(problems) == 2


def test_first_of_repeated_keys_wins() -> None:
    values, problems = parse_txt([b"role=server", b"ROLE=agent", b"role=bootstrap"])
    assert values == {"role": "server"}
    assert problems == [
        "item 1: repeated key 'role' ignored (RFC 6763 §6.4)",
        "item 2: repeated key 'role' ignored (RFC 6763 §6.4)",
    ]


def test_a_bad_first_value_is_not_replaced_by_a_later_one() -> None:
    assert advert(b"ip4=bogus", b"ip4=10.0.0.1").ip4 == ""


@pytest.mark.parametrize("txt", [[], [b""], [b"", b""]])
def test_empty_txt(txt: list[bytes]) -> None:
    assert parse_txt(txt) == ({}, [])
    with pytest.raises(RecordError, match="k3s=1"):
        parse_advert(txt)


@pytest.mark.parametrize(
    ("item", "field", "value"),
    [
        (b"ip4=192.168.1.10", "ip4", "192.168.1.10"),
        (b"ip4=192.168.001.010", "ip4", ""),  # leading zeros are ambiguous (octal)
        (b"ip4=fe80::1", "ip4", ""),
        (b"ip4=node1.local", "ip4", ""),
        (b"ip6=FE80:0::1%eth0", "ip6", "fe80::1%eth0"),
        (b"ip6=2001:db8::5", "ip6", "2001:db8::5"),
        (b"ip6=fe80::1%", "ip6", ""),
        (b"ip6=192.168.1.10", "ip6", ""),
        (b"ca=" + CA.upper().encode(), "ca", CA),
        (b"ca=" + CA[:-1].encode(), "ca", ""),
        (b"v=2", "v", 2),
        (b"v=007", "v", 7),
        (b"v=x", "v", SCHEMA_VERSION),
        (b"v=+2", "v", SCHEMA_VERSION),
        (b"v=0", "v", SCHEMA_VERSION),
        (b"v=", "v", SCHEMA_VERSION),
    ],
)
def test_field_rules(item: bytes, field: str, value: object) -> None:
    assert getattr(advert(item), field) == value
    _, problems = parse_txt([item])
    assert bool(problems) == (value in ("", SCHEMA_VERSION) and item != b"v=1")


def test_a_later_schema_is_read() -> None:
    got = advert(b"v=9", b"future=yes")
    assert got.v == 9
    assert parse_txt([b"future=yes"]) == ({"future": "yes"}, [])


@given(st.lists(near_valid_items, max_size=20))
@example([b"k3s=1", b"cluster=\xff", b"env=\x00", b"role=server\xff"])
@example([b"k3s=1", b"cluster=a", b"env=b", b"role=server", b"ip6=::1%\xe2\x80\xa8"])
def test_any_bytes_give_an_advert_or_a_record_error(items: list[bytes]) -> None:
    values, problems = parse_txt(items)
    assert all(one_line(p) for p in problems)
    assert all(key == key.lower() for key in values)
    try:
        parse_advert(items)
    except RecordError as err:
        assert one_line(str(err))


# --- names --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "normal"),
    [
        ("", ""),
        (".", ""),
        (" \t", ""),
        ("Node1", "node1.local"),
        ("node1.", "node1.local"),
        ("node1.local", "node1.local"),
        ("node1.LOCAL.", "node1.local"),
        ("node1.local.local.local", "node1.local"),
        ("node1.local . ", "node1.local"),
        ("no\u2028de1\x00", "node1.local"),
        ("node\udcff1", "node1.local"),  # surrogateescape'd byte from a non-UTF-8 hostname
        ("pi.lan", "pi.lan"),
        ("local", "local.local"),
    ],
)
def test_normalize_host(name: str, normal: str) -> None:
    assert normalize_host(name) == normal


@given(st.text())
def test_normalize_host_is_idempotent(name: str) -> None:
    assert normalize_host(normalize_host(name)) == normalize_host(name)


def test_service_type() -> None:
    assert service_type("sugar", "dev") == "_k3s-sugar-dev._tcp"
    assert service_type("Sugar", "PROD") == "_k3s-sugar-prod._tcp"


@pytest.mark.parametrize(("cluster", "env"), [("", "dev"), ("a.b", "dev"), ("sugar", "d v"),
                                              ("sugar", "dev\n"), ("x" * 60, "dev")])
def test_service_type_refuses_unfit_names(cluster: str, env: str) -> None:
    with pytest.raises(RecordError) as caught:
        service_type(cluster, env)
    assert one_line(str(caught.value))


@pytest.mark.parametrize("hostname", ["node1", "node1.local", "NODE1.local.", "node1.local.local"])
def test_instance_name(hostname: str) -> None:
    name = instance_name("sugar", "dev", hostname, Role.SERVER)
    assert name == "k3s-sugar-dev@node1.local (server)"


@pytest.mark.parametrize("hostname", ["", "...", "bad host", "n" * 40])
def test_instance_name_refuses_unfit_hosts(hostname: str) -> None:
    with pytest.raises(RecordError) as caught:
        instance_name("sugar", "dev", hostname, Role.CANDIDATE)
    assert one_line(str(caught.value))


def test_service_record_key_ignores_interface_and_protocol() -> None:
    common = {
        "name": "k3s-sugar-dev@node1.local (server)", "stype": "_k3s-sugar-dev._tcp",
        "domain": "local", "host": "node1.local", "port": 6443, "txt": tuple(BASE),
    }
    v4 = ServiceRecord(address="192.168.1.10", interface=2, protocol=0, **common)
    v6 = ServiceRecord(address="fe80::1", interface=3, protocol=1, **common)
    assert v4.key == v6.key == (common["name"], "_k3s-sugar-dev._tcp", "local")
    assert v4 != v6
