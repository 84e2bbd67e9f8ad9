"""Event lines, journald priorities, the Redactor and the salt file of agent.log."""

import io
import ipaddress
import os
import re
import stat
import string
import time
import unicodedata
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from agent import const
from agent.log import EventLog, Level, Redactor, format_event, load_salt, printable

SALT = b"0123456789abcdef"
PSEUDONYM_IP = re.compile(r"ip-[0-9a-f]{6}")
PSEUDONYM_MAC = re.compile(r"mac-[0-9a-f]{6}")
HEX64 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
SECURE_TOKEN = f"K10{HEX64}::server:5e8a1c2b9d7f4e3a"


# --- a reader for the line format, as an operator's tooling would parse it ---------------------

_PAIR = re.compile(r'([A-Za-z0-9_.-]+)=("(?:[^"\\]|\\.)*"|[^\s"]+)(?: |$)')
_UNESCAPE = re.compile(r"\\(x[0-9a-f]{2}|u[0-9a-f]{4}|.)")
_SIMPLE = {"n": "\n", "r": "\r", "t": "\t", '"': '"', "\\": "\\"}


def parse_line(line: str) -> list[tuple[str, str]]:
    """The (key, value) pairs of one line; fails the test if the line is not exactly pairs."""
    pairs, position = [], 0
    while position < len(line):
        match = _PAIR.match(line, position)
        assert match is not None, f"unparsable at {position}: {line!r}"
        key, raw = match.groups()
        if raw.startswith('"'):
            raw = _UNESCAPE.sub(lambda m: _SIMPLE.get(m[1]) or chr(int(m[1][1:], 16)), raw[1:-1])
        pairs.append((key, raw))
        position = match.end()
    return pairs


# --- format_event --------------------------------------------------------------------------------


def test_fields_keep_their_order_and_none_is_skipped() -> None:
    line = format_event("peer_seen", {"host": "node1.local", "ip6": None, "role": "server"})
    assert line == "event=peer_seen host=node1.local role=server"


@pytest.mark.parametrize(
    ("value", "rendered"),
    [
        (True, "true"),
        (False, "false"),
        (0, "0"),
        (6443, "6443"),
        (1 / 3, "0.333"),
        (12.3456, "12.346"),
        (2.0, "2.0"),
        (0.25, "0.25"),
        (1500.0, "1500.0"),
        (1e-9, "0.0"),
        (-1e-9, "0.0"),
        (float("nan"), "nan"),
        (float("inf"), "inf"),
        ("server", "server"),
        (Path("/etc/sugarkube"), "/etc/sugarkube"),
    ],
)
def test_values_render(value: object, rendered: str) -> None:
    assert format_event("e", {"v": value}) == f"event=e v={rendered}"


@pytest.mark.parametrize(
    ("value", "quoted"),
    [
        ("two words", '"two words"'),
        ("", '""'),
        ('say "hi"', r'"say \"hi\""'),
        ("a=b", '"a=b"'),
        ("C:\\path", r'"C:\\path"'),
        ("line one\nline two", r'"line one\nline two"'),
        ("cr\rtab\t", r'"cr\rtab\t"'),
        ("nul\x00bell\x07del\x7f", r'"nul\x00bell\x07del\x7f"'),
        ("sep\u2028par\u2029", r'"sep\u2028par\u2029"'),
        ("bidi\u202eevil", r'"bidi\u202eevil"'),
        ("lone\udcffsurrogate", r'"lone\udcffsurrogate"'),
        ("café", "café"),
        ("<token>", "<token>"),
    ],
)
def test_values_are_quoted_and_escaped_when_needed(value: str, quoted: str) -> None:
    line = format_event("e", {"v": value})
    assert line == f"event=e v={quoted}"
    assert parse_line(line) == [("event", "e"), ("v", value)]


def test_event_name_and_keys_cannot_break_the_line() -> None:
    line = format_event("bad name=x\n", {"a key": "v", "": "w"})
    assert line == "event=bad_name_x_ a_key=v _=w"


def test_a_value_whose_str_raises_is_still_logged() -> None:
    class Broken:
        def __str__(self) -> str:
            raise RuntimeError("boom")

    assert format_event("e", {"v": Broken(), "n": 1}) == 'event=e v="<unprintable Broken>" n=1'


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("k3s-sugar-dev@node1.local (server)", "k3s-sugar-dev@node1.local (server)"),
        ("Zürich 東京", "Zürich 東京"),
        ("a\x1b[2Jb\x1b]0;title\x07", "a\\x1b[2Jb\\x1b]0;title\\x07"),
        ("\x9b31m", "\\x9b31m"),  # C1 CSI: as good as ESC [ on many terminals
        ("gnp.\u202eexe \u2066x\u2069 \u061c", "gnp.\\u202eexe \\u2066x\\u2069 \\u061c"),
        ("zero\u200bwidth\ufeff", "zero\\u200bwidth\\ufeff"),
        ("tag\U000e0041", "tag\\U000e0041"),
        ("line\nbreak\ttab\r\u2028", "line\\nbreak\\ttab\\r\\u2028"),
        ("back\\x1b", "back\\\\x1b"),  # a backslash in the name cannot pose as an escape
        ("nb\u00a0sp", "nb\\xa0sp"),
    ],
)
def test_printable_escapes_what_a_terminal_would_act_on(text: str, shown: str) -> None:
    assert printable(text) == shown


@given(st.text())
def test_printable_leaves_no_control_format_or_separator_character(text: str) -> None:
    assert all(c == " " or unicodedata.category(c)[0] not in "CZ" for c in printable(text))


_KEYS = st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True).filter(lambda k: k != "event")


@given(st.dictionaries(_KEYS, st.text(), max_size=6))
@example({"msg": "a\nb", "quote": '"', "backslash": "\\n"})
def test_any_text_values_make_one_line_that_parses_back(fields: dict[str, str]) -> None:
    line = format_event("e", fields)
    assert line.splitlines() == [line]
    assert parse_line(line) == [("event", "e"), *fields.items()]


@given(st.text())
def test_redacted_lines_are_single_lines(text: str) -> None:
    line = format_event("e", {"msg": text}, Redactor(SALT))
    assert line.splitlines() == [line]


# --- Redactor: tokens and secrets ---------------------------------------------------------------

WORDS = st.text(alphabet=string.ascii_letters + " ", max_size=20)
SEPARATORS = st.sampled_from([" ", "\t", "\n", ",", ";", "=", "(", ")", "<", ">", "'", '"', "|"])
AFTER = st.sampled_from(["", ".", ",", ":", "/64", ")"])


@st.composite
def embedded(draw: st.DrawFn, text: str) -> tuple[str, str]:
    """`text` inside random words and separators, and those words (to tell chance overlaps)."""
    before, after = draw(WORDS), draw(WORDS)
    return before + draw(SEPARATORS) + text + draw(AFTER) + draw(SEPARATORS) + after, before + after


_PASSWORD = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, blacklist_characters="\"'`"),
    min_size=1,
    max_size=40,
)


@given(st.text(alphabet="0123456789abcdef", min_size=64, max_size=64), _PASSWORD, st.data())
def test_secure_tokens_never_reach_the_line(
    hexhash: str, password: str, data: st.DataObject
) -> None:
    token = f"K10{hexhash}::server:{password}"
    text, words = data.draw(embedded(token))
    redactor = Redactor(SALT)
    line = format_event("join", {"msg": text}, redactor)
    assert token not in line
    assert hexhash not in line
    assert "<token>" in line
    if len(password) >= 4 and password not in words:
        assert password not in redactor(text).replace("<token>", "")


@pytest.mark.parametrize(
    "token",
    [
        SECURE_TOKEN,
        f"K10{HEX64}::node:5e8a1c2b9d7f4e3a",
        f"K10{HEX64}::abcdef.0123456789abcdef",  # bootstrap token id.secret
        "K10deadbeefcafe",  # any K10 word
        "::server:5e8a1c2b9d7f4e3a",  # node-token shape without the CA hash
        "mytoken::node:s3cr3tpass",
    ],
)
@pytest.mark.parametrize("addresses", [True, False])
def test_token_shapes_are_removed_even_without_address_redaction(
    token: str, addresses: bool
) -> None:
    line = format_event(
        "e", {"token": token, "msg": f"using {token}, ok"}, Redactor(SALT, addresses=addresses)
    )
    assert line == 'event=e token=<token> msg="using <token> ok"'


def test_configured_secrets_and_token_password_parts_are_removed() -> None:
    redactor = Redactor(SALT, secrets=["correct horse battery"])
    redactor.add_secret(SECURE_TOKEN)
    text = 'pass="correct horse battery" pw=5e8a1c2b9d7f4e3a'
    assert redactor(text) == 'pass="<token>" pw=<token>'


def test_short_secrets_are_ignored() -> None:
    redactor = Redactor(SALT, secrets=["", "dev", "1234567"])
    assert redactor("dev cluster 1234567 ready") == "dev cluster 1234567 ready"


@given(st.text(min_size=const.SECRET_MIN_LENGTH, max_size=30), st.text(), st.text())
@example("en>abcde", "", "abcde")  # a replacement that joins its neighbours into the secret again
def test_configured_secrets_never_survive(secret: str, before: str, after: str) -> None:
    redactor = Redactor(SALT, secrets=[secret])
    assert secret not in redactor(before + secret + after)


# --- Redactor: addresses -----------------------------------------------------------------------

ZONES = st.from_regex(r"[a-z][a-z0-9]{0,6}", fullmatch=True)
PORTS = st.integers(1, 65535)


def mixed_forms(address: ipaddress.IPv6Address) -> list[str]:
    """The address with its last 32 bits written as dotted IPv4, full and compressed."""
    dotted = str(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    full = ":".join(address.exploded.split(":")[:6]) + ":" + dotted
    # A non-zero sentinel in the last 32 bits keeps `::` out of them; then swap in the dotted quad.
    head = ipaddress.IPv6Address((int(address) & ~0xFFFFFFFF) | 0x10001).compressed
    short = head.removesuffix("1:1") + dotted
    forms = [full, short]
    assert all(ipaddress.IPv6Address(form) == address for form in forms)
    return forms


@st.composite
def ipv6_addresses(draw: st.DrawFn) -> ipaddress.IPv6Address:
    """IPv6 addresses with runs of zero groups (so every compression is exercised)."""
    groups = draw(st.lists(st.one_of(st.just(0), st.integers(0, 0xFFFF)), min_size=8, max_size=8))
    if draw(st.booleans()):
        groups[:6] = [0, 0, 0, 0, 0, 0xFFFF]  # IPv4-mapped
    return ipaddress.IPv6Address(":".join(f"{g:x}" for g in groups))


@given(ipv6_addresses(), ZONES, PORTS, st.data())
def test_ipv6_in_any_form_becomes_one_pseudonym(
    address: ipaddress.IPv6Address, zone: str, port: int, data: st.DataObject
) -> None:
    host = address.ipv4_mapped or address
    assume(not host.is_unspecified)
    redactor = Redactor(SALT)
    pseudonym = redactor(str(host))
    assert PSEUDONYM_IP.fullmatch(pseudonym)

    plain = [address.compressed, address.exploded, *mixed_forms(address)]
    forms = [*plain, *(f.upper() for f in plain)]
    assert {redactor(form) for form in forms} == {pseudonym}

    written = data.draw(st.sampled_from(forms))
    wrapped = data.draw(
        st.sampled_from(
            [written, f"[{written}]:{port}", f"{written}%{zone}", f"[{written}%{zone}]:{port}"]
        )
    )
    text, _ = data.draw(embedded(wrapped))
    line = format_event("peer", {"msg": text}, redactor)
    dotted_tail = str(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    for original in [*plain, str(host), dotted_tail]:
        assert original.lower() not in line.lower()
    assert pseudonym in line
    assert redactor(redactor(text)) == redactor(text)


@given(st.integers(1, 2**32 - 1).map(ipaddress.IPv4Address), PORTS, st.data())
def test_ipv4_in_any_form_becomes_one_pseudonym(
    address: ipaddress.IPv4Address, port: int, data: st.DataObject
) -> None:
    redactor = Redactor(SALT)
    pseudonym = redactor(str(address))
    assert PSEUDONYM_IP.fullmatch(pseudonym)
    padded = ".".join(f"{octet:03d}" for octet in address.packed)
    mapped = f"::ffff:{address}"
    assert {redactor(form) for form in (str(address), padded, mapped, mapped.upper())} == {
        pseudonym
    }

    written = data.draw(
        st.sampled_from([str(address), padded, f"{address}:{port}", f"[{mapped}]:{port}"])
    )
    text, _ = data.draw(embedded(written))
    line = format_event("peer", {"msg": text}, redactor)
    assert str(address) not in line
    assert padded not in line
    assert pseudonym in line


@given(st.binary(min_size=6, max_size=6), st.data())
def test_mac_in_any_form_becomes_one_pseudonym(mac: bytes, data: st.DataObject) -> None:
    redactor = Redactor(SALT)
    forms = [sep.join(f"{b:02x}" for b in mac) for sep in (":", "-")]
    forms += [form.upper() for form in forms]
    pseudonym = redactor(forms[0])
    assert PSEUDONYM_MAC.fullmatch(pseudonym)
    assert {redactor(form) for form in forms} == {pseudonym}

    text, _ = data.draw(embedded(data.draw(st.sampled_from(forms))))
    line = format_event("link", {"msg": text}, redactor)
    for form in forms:
        assert form.lower() not in line.lower()
    assert pseudonym in line


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        ("listening on [::1]:6443", "listening on [P]:6443"),
        ("route via fe80::1%eth0.", "route via P%eth0."),
        ("https://10.0.0.5:6443/cacerts", "https://P:6443/cacerts"),
        ("inet 192.168.1.20/24 brd", "inet P/24 brd"),
        ("peer 2001:db8::1: refused", "peer P: refused"),
        ("unbracketed 2001:db8:0:0:0:0:0:1:6443", "unbracketed P:6443"),
        ("hw aa:bb:cc:dd:ee:ff: up", "hw P: up"),
        ("mac-aa-bb-cc-dd-ee-ff", "mac-P"),
        ("1::", "P"),
        ("ip6:fe80::1 HWaddr:AA:BB:CC:DD:EE:FF addr:10.0.0.5", "ip6:P HWaddr:P addr:P"),
        ("('fe80::1', 6443, 0, 2) ('10.0.0.5', 6443)", "('P', 6443, 0, 2) ('P', 6443)"),
        ("range 10.0.0.1-10.0.0.9", "range P-P"),
    ],
)
def test_address_context_stays_readable(text: str, redacted: str) -> None:
    pseudonym = re.compile(r"(?:ip|mac)-[0-9a-f]{6}")
    assert pseudonym.sub("P", Redactor(SALT)(text)) == redacted


@pytest.mark.parametrize(
    "text",
    [
        "::",  # unspecified, and C++/Ruby scope syntax
        "0.0.0.0:9469",
        "0:0:0:0:0:0:0:0",
        "std::vector and Foo::Bar",
        "12:30:45 and 12:30:45.123456 and 2024-05-01T12:30:45+02:00",
        "ms_elapsed=12.345 version=0.47.3 kernel=6.6.31+rpt-rpi-2712",
        "1.2.3.4.5 and 256.1.1.1 and 1.2.3",
        "11-22-33-44-55-66-77",  # a longer dash-pair run is not a MAC
        "a:a:a:a:a:a:a:a:a:a",
        "ip-3fa2c1 mac-9b01de",  # pseudonyms are stable under a second pass
        "_k3s-sugar-dev._tcp k3s-sugar-dev@node1.local (server)",
    ],
)
def test_things_that_are_not_addresses_survive(text: str) -> None:
    assert Redactor(SALT)(text) == text


_LABEL = st.from_regex(r"[a-z](?:[a-z0-9-]{0,13}[a-z0-9])?", fullmatch=True)
_VERSIONS = st.builds(
    lambda prefix, parts, suffix: prefix + ".".join(map(str, parts)) + suffix,
    st.sampled_from(["", "v"]),
    st.one_of(
        st.lists(st.integers(0, 999), min_size=1, max_size=3),
        st.lists(st.integers(0, 999), min_size=4, max_size=4).filter(lambda p: max(p) > 255),
        st.lists(st.integers(0, 255), min_size=5, max_size=6),
    ),
    st.sampled_from(["", "+k3s1", "-rpi7", "~deb12u1"]),
)
_TIMES = st.builds(
    lambda h, m, s, frac, date, zone: f"{date}{h:02d}:{m:02d}:{s:02d}{frac}{zone}",
    st.integers(0, 23),
    st.integers(0, 59),
    st.integers(0, 59),
    st.sampled_from(["", ".5", ".123", ".123456", ",250"]),
    st.sampled_from(["", "2024-05-01T", "2024-05-01 "]),
    st.sampled_from(["", "Z", "+02:00", "-0700"]),
)
_HOSTNAMES = st.builds(
    lambda labels, local: ".".join(labels) + local,
    st.lists(_LABEL, min_size=1, max_size=3),
    st.sampled_from(["", ".local", ".local."]),
)
_SERVICE_TYPES = st.builds(
    lambda cluster, env: f"_k3s-{cluster}-{env}._tcp",
    st.from_regex(r"[a-z0-9]{1,10}", fullmatch=True),
    st.sampled_from(["dev", "staging", "prod"]),
)
_MS = st.floats(0, 1e6, allow_nan=False).map(lambda ms: f"ms_elapsed={ms:.3f}")


@given(
    st.one_of(_VERSIONS, _TIMES, _HOSTNAMES, _SERVICE_TYPES, _MS),
    WORDS,
    SEPARATORS,
    WORDS,
)
def test_versions_times_hostnames_and_service_types_survive(
    value: str, before: str, separator: str, after: str
) -> None:
    text = f"{before}{separator}{value}{separator}{after}"
    assert Redactor(SALT)(text) == text


def test_operators_can_opt_out_of_address_redaction() -> None:
    text = "peer 10.0.0.5 fe80::1 aa:bb:cc:dd:ee:ff"
    assert Redactor(SALT, addresses=False)(text) == text


def test_pseudonyms_depend_on_the_salt_only() -> None:
    assert Redactor(SALT)("10.0.0.5") == Redactor(SALT)("10.0.0.5")
    assert Redactor(SALT)("10.0.0.5") != Redactor(b"another salt....")("10.0.0.5")
    assert Redactor(SALT)("10.0.0.5") != Redactor(SALT)("10.0.0.6")


# --- Redactor: speed ---------------------------------------------------------------------------


def _best_ms(function: Callable[[], object], runs: int = 5) -> float:
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        function()
        best = min(best, (time.perf_counter() - start) * 1000)
    return best


def test_a_10_kb_line_takes_well_under_a_millisecond_per_kb() -> None:
    chunk = (
        "peer_seen host=node{i}.local ip4=10.0.{i}.7 ip6=fe80::{i:x}:1%eth0 "
        "mac=aa:bb:cc:dd:ee:{i:02x} version=0.47.3 at 12:30:45 token=" + SECURE_TOKEN + " "
    )
    line = "".join(chunk.format(i=i % 256) for i in range(200))[:10240]
    redactor = Redactor(SALT)
    assert _best_ms(lambda: redactor(line)) < 10.0  # 1 ms per kB; measured ~0.4 ms per kB


@pytest.mark.parametrize(
    "adversarial",
    [
        "a:" * 5000,
        "1:" * 5000 + "x",
        "aa:" * 3400 + "g",
        ":" * 10000,
        "a::" * 3400,
        "[::" * 3400,
        "1." * 5000,
        "1.2." * 2500 + "x",
        "aa-" * 3400,
        "-" * 10000,
        "a" * 10000 + "::server:",
        "K10" + "a" * 10000,
        "a.b-c+" * 1700 + ":",
        "g" * 10000,
        "g:" * 5000,
        "ga:1:" * 2000 + "x",
        "g-" * 5000 + ":1:",
    ],
)
def test_adversarial_input_takes_linear_time(adversarial: str) -> None:
    redactor = Redactor(SALT, secrets=["hunter2hunter2"])
    # Catastrophic backtracking on 10 kB costs seconds; linear scanning costs a few ms.
    assert _best_ms(lambda: redactor(adversarial), runs=3) < 50.0


# --- EventLog ----------------------------------------------------------------------------------


def test_plain_lines_on_a_stream_that_is_not_the_journal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    stream = io.StringIO()
    log = EventLog(stream, Redactor(SALT))
    log.event("discovered", "notice", ms_elapsed=87.25, peers=2)
    log.event("stopped")
    assert stream.getvalue() == "event=discovered ms_elapsed=87.25 peers=2\nevent=stopped\n"


@pytest.mark.parametrize(
    ("level", "prefix"),
    [
        ("critical", "<2>"),
        ("error", "<3>"),
        ("warning", "<4>"),
        ("notice", "<5>"),
        ("info", "<6>"),
        ("debug", "<7>"),
    ],
)
def test_journal_mode_prefixes_the_priority(level: Level, prefix: str) -> None:
    stream = io.StringIO()
    log = EventLog(stream, Redactor(SALT), journal=True)
    log.debug_enabled = True
    log.event("e", level, k="v")
    assert stream.getvalue() == f"{prefix}event=e k=v\n"


def test_journal_is_detected_from_journal_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "journal"
    with path.open("w", encoding="utf-8") as stream:
        info = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{info.st_dev}:{info.st_ino}")
        log = EventLog(stream, Redactor(SALT))
        log.event("gate_released", "warning", ms_elapsed=1203.0)
        # Read while still open: each event is flushed.
        assert path.read_text(encoding="utf-8") == "<4>event=gate_released ms_elapsed=1203.0\n"


def test_default_stream_is_stderr_and_is_detected_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "stderr"
    with path.open("w", encoding="utf-8") as stream:
        monkeypatch.setattr("sys.stderr", stream)
        info = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{info.st_dev}:{info.st_ino}")
        EventLog(redactor=Redactor(SALT)).event("started")
        assert path.read_text(encoding="utf-8") == "<6>event=started\n"


@pytest.mark.parametrize("value", ["another file", "", "garbage", "1:", ":2", "1:2:3", "x:y"])
def test_other_journal_streams_mean_plain_lines(
    value: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if value == "another file":
        other = tmp_path / "other"
        other.touch()
        value = f"{other.stat().st_dev}:{other.stat().st_ino}"
    path = tmp_path / "log"
    with path.open("w", encoding="utf-8") as stream:
        monkeypatch.setenv("JOURNAL_STREAM", value)
        EventLog(stream, Redactor(SALT)).event("started")
        assert path.read_text(encoding="utf-8") == "event=started\n"


def test_debug_lines_only_when_enabled() -> None:
    stream = io.StringIO()
    log = EventLog(stream, Redactor(SALT), journal=False)
    log.event("avahi_signal", "debug", name="ItemNew")
    assert stream.getvalue() == ""
    log.debug_enabled = True
    log.event("avahi_signal", "debug", name="ItemNew")
    assert stream.getvalue() == "event=avahi_signal name=ItemNew\n"


def test_fields_may_be_called_name_or_level() -> None:
    stream = io.StringIO()
    EventLog(stream, Redactor(SALT), journal=False).event("e", "info", name="n", level="l")
    assert stream.getvalue() == "event=e name=n level=l\n"


def test_lines_are_redacted_by_default_and_by_a_later_redactor() -> None:
    stream = io.StringIO()
    log = EventLog(stream, journal=False)
    log.event("joined", server="10.0.0.5", token=SECURE_TOKEN, secret="hunter2hunter2")
    log.set_redactor(Redactor(SALT, secrets=["hunter2hunter2"]))
    log.event("joined", secret="hunter2hunter2")
    first, second = stream.getvalue().splitlines()
    assert re.fullmatch(
        r"event=joined server=ip-[0-9a-f]{6} token=<token> secret=hunter2hunter2", first
    )
    assert second == "event=joined secret=<token>"


class _BrokenPipe(io.StringIO):
    def write(self, text: str) -> int:
        raise BrokenPipeError


class _FailingFlush(io.StringIO):
    def flush(self) -> None:
        raise OSError("EIO")


@pytest.mark.parametrize("make_stream", [_BrokenPipe, _FailingFlush])
def test_a_broken_stream_never_raises_into_the_caller(
    make_stream: Callable[[], io.StringIO],
) -> None:
    EventLog(make_stream(), Redactor(SALT), journal=True).event("e", "error", k="v")


def test_a_closed_stream_never_raises_into_the_caller() -> None:
    stream = io.StringIO()
    log = EventLog(stream, Redactor(SALT))
    stream.close()
    log.event("e", "error", k="v")


def test_unencodable_text_never_raises_into_the_caller(tmp_path: Path) -> None:
    with (tmp_path / "ascii").open("w", encoding="ascii") as stream:
        EventLog(stream, Redactor(SALT), journal=False).event("e", msg="café")


# --- load_salt ---------------------------------------------------------------------------------


def test_salt_is_created_private_and_then_reused(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "parent" / "salt"
    salt = load_salt(path)
    assert len(salt) == const.LOG_SALT_SIZE
    assert path.read_bytes() == salt
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_salt(path) == salt
    assert os.listdir(path.parent) == ["salt"]  # no temporary file left behind


def test_a_corrupt_salt_file_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "salt"
    path.write_bytes(b"short")
    salt = load_salt(path)
    assert len(salt) == const.LOG_SALT_SIZE
    assert path.read_bytes() == salt
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_racing_first_runs_agree_on_one_salt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "salt"
    winner = b"W" * const.LOG_SALT_SIZE
    real_link = os.link

    def link_after_another_process(source: Path, target: Path) -> None:
        Path(target).write_bytes(winner)
        real_link(source, target)

    monkeypatch.setattr("agent.log.os.link", link_after_another_process)
    assert load_salt(path) == winner
    assert path.read_bytes() == winner
    assert os.listdir(tmp_path) == ["salt"]


@pytest.mark.parametrize("unusable", ["under_a_file", "a_directory"])
def test_an_unusable_salt_path_gives_a_random_salt(unusable: str, tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    if unusable == "under_a_file":
        blocker.write_bytes(b"x")
        path = blocker / "salt"
    else:
        blocker.mkdir()
        path = blocker
    first, second = load_salt(path), load_salt(path)
    assert len(first) == len(second) == const.LOG_SALT_SIZE
    assert first != second
