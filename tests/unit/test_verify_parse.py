"""The verifier's pure parsers: known shapes, and arbitrary text never raising past ParseError."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.verify import parse
from tests.unit.test_verify_fakes import BROWSE_LINE, FIB_TRIE, nodes_json

REAL_FIB_TRIE = """Main:
  +-- 0.0.0.0/0 3 0 5
     +-- 127.0.0.0/8 2 0 2
        +-- 127.0.0.0/31 1 0 0
           |-- 127.0.0.0
              /8 host LOCAL
           |-- 127.0.0.1
              /32 host LOCAL
     +-- 192.0.2.0/24 2 0 2
           |-- 192.0.2.2
              /32 host LOCAL
        |-- 192.0.2.255
           /32 link BROADCAST
Local:
     +-- 192.0.2.0/24 2 0 2
           |-- 192.0.2.2
              /32 host LOCAL
"""

PARSERS: list[Callable[[str], Any]] = [
    parse.active_swaps,
    parse.flag_value,
    parse.dbus_int,
    parse.cloud_init_status,
    parse.iptables_backend,
    parse.dropin_proxy_mode,
    lambda text: parse.node_ready(text, "node1"),
]
TOTAL: list[Callable[[str], Any]] = [
    parse.cmdline_tokens,
    parse.cgroup2_controllers,
    parse.cgroup1_enabled,
    parse.mountinfo,
    lambda text: parse.mount_of(parse.mountinfo(text), "/var/lib/rancher/k3s/server/db"),
    parse.block_kind,
    parse.local_ipv4,
    parse.local_ipv6,
    parse.normal_address,
    parse.avahi_name,
    parse.avahi_browse,
    parse.avahi_resolve,
    parse.proxy_mode,
    parse.check_config_problems,
]


@given(st.text())
def test_parsers_raise_nothing_but_parse_error(text: str) -> None:
    for parser in PARSERS:
        with contextlib.suppress(parse.ParseError):
            parser(text)


@given(st.text())
def test_total_parsers_never_raise(text: str) -> None:
    for parser in TOTAL:
        parser(text)


@given(
    st.lists(st.sampled_from(["{", "[", "- ", ":", "&a", "*a", "!!python/object", "\n", "'", "x"]))
)
def test_yaml_shaped_garbage_in_the_dropin_is_a_parse_error_at_worst(parts: list[str]) -> None:
    with contextlib.suppress(parse.ParseError):
        parse.dropin_proxy_mode("".join(parts))


def test_avahi_browse_resolved_lines_are_decoded() -> None:
    records = parse.avahi_browse("+;eth0;IPv4;x;_https._tcp;local\n" + BROWSE_LINE + "\n=;short\n")
    assert len(records) == 1
    record = records[0]
    assert record.instance == "k3s-sugar-dev@node1.local (server)"
    assert (record.host, record.address, record.port) == ("node1.local", "192.168.50.11", 6443)
    assert record.txt.startswith('"k3s=1"')


@pytest.mark.parametrize(
    ("escaped", "plain"),
    [
        (r"a\.b", "a.b"),
        (r"back\\slash", "back\\slash"),
        (r"caf\195\169", "café"),
        (r"semi\059colon", "semi;colon"),
        ("trailing\\", "trailing\\"),
        (r"\999", "999"),
    ],
)
def test_avahi_name_unescapes(escaped: str, plain: str) -> None:
    assert parse.avahi_name(escaped) == plain


def test_host_key_compares_case_and_trailing_dots_away() -> None:
    assert parse.host_key(" Node1.LOCAL. ") == "node1.local"


def test_local_addresses_from_the_kernel_tables() -> None:
    assert parse.local_ipv4(REAL_FIB_TRIE) == {"127.0.0.1", "192.0.2.2"}
    assert parse.local_ipv4(FIB_TRIE) == {"127.0.0.1", "192.168.50.11"}
    assert parse.local_ipv6("fd000000000000000000000000000002 04 40 00 82     eth0\nzz\n") == {
        "fd00::2"
    }


def test_normal_address_drops_the_scope() -> None:
    assert parse.normal_address("fe80::0001%eth0") == "fe80::1"
    assert parse.normal_address("node1.local") is None


def test_mountinfo_decodes_octal_escapes_and_picks_the_longest_prefix() -> None:
    mounts = parse.mountinfo(
        "22 1 179:2 / / rw - ext4 /dev/mmcblk0p2 rw\n"
        "30 22 259:1 / /var/lib/my\\040data rw shared:3 - ext4 /dev/nvme0n1p1 rw\n"
        "31 22 259:2 / /var/lib/rancher rw - ext4 /dev/nvme0n1p2 rw\n"
    )
    assert mounts[1].mount_point == "/var/lib/my data"
    held = parse.mount_of(mounts, "/var/lib/rancher/k3s/server/db")
    assert held is not None and held.source == "/dev/nvme0n1p2"
    root = parse.mount_of(mounts, "/var/lib/ranchero")
    assert root is not None and root.mount_point == "/"


@pytest.mark.parametrize(
    ("device", "kind"),
    [
        ("/dev/nvme0n1p2", "nvme"),
        ("mmcblk0p2", "sd"),
        ("sda2", "usb"),
        ("sdaa", "usb"),
        ("vda", "other"),
        ("dm-0", "other"),
    ],
)
def test_block_kind(device: str, kind: str) -> None:
    assert parse.block_kind(device) == kind


def test_swaps_lists_devices_after_the_header() -> None:
    text = (
        "Filename Type Size Used Priority\n"
        "/swap\\040file file 1024 0 -2\n"
        "/dev/zram0 partition 10 0 100\n"
    )
    assert parse.active_swaps(text) == ["/swap file", "/dev/zram0"]


def test_dbus_reply_integer() -> None:
    assert parse.dbus_int("method return time=1 sender=:1.3\n   int32 2\n") == 2
    with pytest.raises(parse.ParseError):
        parse.dbus_int('method return\n   string "int32 2"\n')


def test_iptables_backend() -> None:
    assert parse.iptables_backend("iptables v1.8.9 (nf_tables)\n") == "nf_tables"
    assert parse.iptables_backend("iptables v1.8.7 (legacy)") == "legacy"
    with pytest.raises(parse.ParseError):
        parse.iptables_backend("ip6tables v1.8.9 (nf_tables)")


@pytest.mark.parametrize(
    ("text", "mode"),
    [
        ("kube-proxy-arg:\n  - proxy-mode=nftables\n", "nftables"),
        ("kube-proxy-arg: proxy-mode=nft\n", "nftables"),
        ('kube-proxy-arg: ["--proxy-mode=IPTABLES"]\n', "iptables"),
        ("kube-proxy-arg:\n  - metrics-bind-address=0.0.0.0\n", None),
        ("", None),
        ("# only a comment\n", None),
    ],
)
def test_dropin_proxy_mode(text: str, mode: str | None) -> None:
    assert parse.dropin_proxy_mode(text) == mode


@pytest.mark.parametrize("depth", [10_000, 100_000])
def test_deeply_nested_input_is_a_parse_error(depth: int) -> None:
    with pytest.raises(parse.ParseError):
        parse.node_ready("[" * depth + "]" * depth, "node1")
    with pytest.raises(parse.ParseError):
        parse.dropin_proxy_mode("[" * depth + "]" * depth)


def test_dropin_refuses_python_tags() -> None:
    with pytest.raises(parse.ParseError):
        parse.dropin_proxy_mode("!!python/object/apply:os.system ['true']\n")


def test_node_ready() -> None:
    assert parse.node_ready(nodes_json(("node1", "True"), ("node2", "False")), "NODE1") == (
        True,
        ["node1", "node2"],
    )
    assert parse.node_ready(nodes_json(("node1", "True")), "node1") == (True, ["node1"])
    assert parse.node_ready(nodes_json(("node1", "Unknown")), "node1") == (False, ["node1"])
    assert parse.node_ready(nodes_json(("node2", "True")), "node1") == (None, ["node2"])


def test_check_config_problems_strip_colours() -> None:
    text = (
        "- CONFIG_A: \x1b[32menabled\x1b[0m\n"
        "- CONFIG_B: \x1b[31mmissing\x1b[0m\n"
        "- links: aux/ip6tables should link to iptables-detect.sh (fail)\n"
        "STATUS: 2 (fail)\n"
    )
    assert parse.check_config_problems(text) == [
        "CONFIG_B: missing",
        "links: aux/ip6tables should link to iptables-detect.sh (fail)",
    ]


def test_cgroup1_enabled_ignores_the_header_and_disabled_rows() -> None:
    text = "#subsys_name\thierarchy\tnum_cgroups\tenabled\ncpu\t1\t1\t1\nmemory\t0\t1\t0\n"
    assert parse.cgroup1_enabled(text) == {"cpu"}
