"""The Avahi checks with fake dbus-send, avahi-browse and avahi-resolve."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from agent.verify import mdns
from agent.verify.result import CheckResult, Status, contain
from tests.unit.test_verify_fakes import ADDRESS, BROWSE_LINE, HOST, FakeNode, shrink_timeouts

NO_DAEMON = 'echo "Failed to create client object: Daemon not running" >&2; exit 1'


@pytest.fixture
def node(tmp_path: Path) -> FakeNode:
    """A healthy fake node."""
    return FakeNode(tmp_path).healthy()


def avahi_dbus(node: FakeNode) -> CheckResult:
    probe = node.probe()
    return contain("avahi_dbus", lambda: mdns.avahi_dbus(probe))


def advertised(node: FakeNode, **probe_args: object) -> CheckResult:
    probe = node.probe(**probe_args)
    return contain("mdns_advertised", lambda: mdns.mdns_advertised(probe))


def unique(node: FakeNode) -> CheckResult:
    probe = node.probe()
    return contain("hostname_unique", lambda: mdns.hostname_unique(probe))


# avahi_dbus


def test_avahi_dbus_asks_get_state_of_avahi(node: FakeNode, tmp_path: Path) -> None:
    argv = tmp_path / "argv"
    node.tool("dbus-send", f'echo "$@" > {argv}; echo "   int32 2"')
    result = avahi_dbus(node)
    assert (result.status, result.detail) == (
        Status.PASS,
        "avahi-daemon owns org.freedesktop.Avahi and is RUNNING",
    )
    assert argv.read_text().split() == [
        "--system",
        "--print-reply",
        "--reply-timeout=10000",
        "--dest=org.freedesktop.Avahi",
        "/",
        "org.freedesktop.Avahi.Server.GetState",
    ]


@pytest.mark.parametrize(
    ("script", "words"),
    [
        ('echo "   int32 1"', "REGISTERING (1), not RUNNING"),
        ('echo "   int32 3"', "COLLISION (3)"),
        ('echo "   int32 42"', "unknown (42)"),
        (
            'echo "Error org.freedesktop.DBus.Error.ServiceUnknown: The name '
            'org.freedesktop.Avahi was not provided by any .service files" >&2; exit 1',
            "nothing owns org.freedesktop.Avahi on the system bus",
        ),
        (
            'echo "Error org.freedesktop.DBus.Error.NameHasNoOwner: no owner" >&2; exit 1',
            "nothing owns",
        ),
        (
            'echo "Error org.freedesktop.DBus.Error.Spawn.FileInvalid: Cannot do system-bus '
            'activation with no user" >&2; exit 1',
            "nothing owns org.freedesktop.Avahi and bus activation failed",
        ),
        (
            "echo 'Failed to open connection to \"system\" message bus: No such file' >&2; exit 1",
            "GetState failed: Failed to open connection",
        ),
        ('echo "method return"; echo "   string \\"RUNNING\\""', "unexpected content"),
        ("exit 0", "unexpected content"),
    ],
)
def test_avahi_dbus_fails(node: FakeNode, script: str, words: str) -> None:
    node.tool("dbus-send", script)
    result = avahi_dbus(node)
    assert result.status is Status.FAIL
    assert words in result.detail


def test_avahi_dbus_skips_without_dbus_send(node: FakeNode) -> None:
    node.no_tool("dbus-send")
    assert avahi_dbus(node).status is Status.SKIP


def test_a_hanging_dbus_send_fails_within_its_deadline(
    node: FakeNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    shrink_timeouts(monkeypatch, 0.3)
    node.tool("dbus-send", "exec /bin/sleep 30")
    started = time.monotonic()
    assert avahi_dbus(node).status is Status.FAIL
    assert time.monotonic() - started < 4


# mdns_advertised


def test_our_advert_is_found_and_described(node: FakeNode) -> None:
    result = advertised(node)
    assert (result.status, result.detail) == (
        Status.PASS,
        "'k3s-sugar-dev@node1.local (server)' on eth0 IPv4, port 6443",
    )


def test_the_browsed_type_comes_from_the_probe(node: FakeNode, tmp_path: Path) -> None:
    argv = tmp_path / "argv"
    node.tool("avahi-browse", f'echo "$@" > {argv}')
    advertised(node, service_type="_k3s-sugar-dev._tcp")
    assert argv.read_text().split() == ["-rpt", "_k3s-sugar-dev._tcp"]


def test_only_other_hosts_advertising_fails(node: FakeNode) -> None:
    other = BROWSE_LINE.replace(f"{HOST}.local;", "node2.local;")
    node.tool("avahi-browse", f"/bin/cat <<'EOF'\n{other}\nEOF")
    result = advertised(node)
    assert result.status is Status.FAIL
    assert "no _https._tcp advert for node1.local on port 6443 (1 other hosts" in result.detail


def test_an_advert_for_our_name_at_another_address_is_not_ours(node: FakeNode) -> None:
    other = BROWSE_LINE.replace(f";{ADDRESS};", ";192.168.50.99;")
    node.tool("avahi-browse", f"/bin/cat <<'EOF'\n{other}\nEOF")
    result = advertised(node)
    assert result.status is Status.FAIL
    assert "points at 192.168.50.99, not at this host" in result.detail
    node.remove("/proc/net/fib_trie")  # without our addresses, the name alone decides
    node.remove("/proc/net/if_inet6")
    assert advertised(node).status is Status.PASS


def test_our_host_on_another_port_does_not_count(node: FakeNode) -> None:
    node.tool("avahi-browse", f"/bin/cat <<'EOF'\n{BROWSE_LINE.replace(';6443;', ';443;')}\nEOF")
    assert advertised(node).status is Status.FAIL


def test_the_host_name_matches_whatever_its_case(node: FakeNode) -> None:
    node.write("/proc/sys/kernel/hostname", "Node1\n")
    line = BROWSE_LINE.replace(f"{HOST}.local;", "NODE1.local.;")
    node.tool("avahi-browse", f"/bin/cat <<'EOF'\n{line}\nEOF")
    assert advertised(node).status is Status.PASS


def test_a_stopped_avahi_daemon_means_not_advertised(node: FakeNode) -> None:
    node.tool("avahi-browse", NO_DAEMON)
    result = advertised(node)
    assert result.status is Status.FAIL
    assert "Daemon not running" in result.detail


def test_junk_from_avahi_browse_is_no_advert(node: FakeNode) -> None:
    node.tool("avahi-browse", "printf '=;;;\\n=;a;b;c;d;e;f;g;notaport;h\\n\\377\\376\\n'")
    assert advertised(node).status is Status.FAIL


def test_advertised_skips_without_avahi_browse_or_a_host_name(node: FakeNode) -> None:
    node.no_tool("avahi-browse")
    assert advertised(node).status is Status.SKIP
    node.healthy().remove("/proc/sys/kernel/hostname")
    assert advertised(node).status is Status.SKIP


def test_the_daemon_can_name_the_host_itself(node: FakeNode) -> None:
    node.remove("/proc/sys/kernel/hostname")
    assert advertised(node, hostname=HOST).status is Status.PASS


# hostname_unique


def test_our_name_resolves_to_us(node: FakeNode) -> None:
    result = unique(node)
    assert (result.status, result.detail) == (
        Status.PASS,
        f"{HOST}.local resolves to {ADDRESS}, this host's",
    )


def test_another_host_answering_for_our_name_fails(node: FakeNode) -> None:
    node.tool("avahi-resolve", 'printf "%s\\t%s\\n" "$2" 192.168.50.99')
    result = unique(node)
    assert result.status is Status.FAIL
    assert "answers with 192.168.50.99, not an address of this host" in result.detail


def test_avahi_having_renamed_us_fails(node: FakeNode) -> None:
    node.tool(
        "avahi-resolve",
        f'if [ "$1" = -n ]; then printf "%s\\t%s\\n" "$2" {ADDRESS}; '
        f'else printf "%s\\t%s\\n" "$2" {HOST}-2.local; fi',
    )
    result = unique(node)
    assert result.status is Status.FAIL
    assert f"avahi publishes this host as {HOST}-2.local: another host holds {HOST}.local" in (
        result.detail
    )


def test_nothing_answering_for_our_name_fails(node: FakeNode) -> None:
    node.tool(
        "avahi-resolve", "echo \"Failed to resolve host name '$2': Timeout reached\" >&2; exit 1"
    )
    result = unique(node)
    assert result.status is Status.FAIL
    assert "nothing answers for node1.local" in result.detail


def test_unique_skips_when_avahi_is_down_or_absent(node: FakeNode) -> None:
    node.tool("avahi-resolve", NO_DAEMON)
    assert unique(node).status is Status.SKIP
    node.no_tool("avahi-resolve")
    assert unique(node).status is Status.SKIP


def test_without_local_addresses_the_reverse_lookup_decides(node: FakeNode) -> None:
    node.remove("/proc/net/fib_trie")
    node.remove("/proc/net/if_inet6")
    assert unique(node).status is Status.PASS
    node.tool(
        "avahi-resolve",
        f'if [ "$1" = -n ]; then printf "%s\\t%s\\n" "$2" {ADDRESS}; else exit 1; fi',
    )
    result = unique(node)
    assert result.status is Status.SKIP
    assert "cannot tell" in result.detail


def test_an_ipv6_answer_is_compared_in_canonical_form(node: FakeNode) -> None:
    node.tool(
        "avahi-resolve",
        'if [ "$1" = -n ]; then printf "%s\\t%s\\n" "$2" "FE80:0:0:0:D2C0:FFFF:FE00:11%eth0"; '
        'else printf "%s\\t%s\\n" "$2" node1.local; fi',
    )
    node.write("/proc/net/if_inet6", "fe80000000000000d2c0fffffe000011 02 40 20 80     eth0\n")
    assert unique(node).status is Status.PASS


def test_junk_from_avahi_resolve_fails(node: FakeNode) -> None:
    node.tool("avahi-resolve", "echo 'node1.local not-an-address'")
    assert unique(node).status is Status.FAIL
