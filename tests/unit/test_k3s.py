"""k3s files: config merged as k3s merges it, our drop-in, membership, the wipe."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import yaml

from agent import const
from agent.cluster import k3s
from agent.cluster.k3s import (
    K3sConfigError,
    K3sError,
    Membership,
    Release,
    api_url,
    membership,
    merged_config,
    remove_dropin,
    render_dropin,
    wipe_state,
    write_dropin,
)
from agent.tokens import TokenError
from tests.unit.test_tokens import CA_SHA, PASSWORD


def write(root: Path, relative: str, text: str) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --- membership -------------------------------------------------------------------------------


def test_membership_none_on_a_fresh_node(tmp_path: Path) -> None:
    assert membership(tmp_path) is Membership.NONE
    (tmp_path / k3s.AGENT_DIR / "etc").mkdir(parents=True)  # servers and failed agents have it
    assert membership(tmp_path) is Membership.NONE


def test_membership_server_by_its_db(tmp_path: Path) -> None:
    (tmp_path / k3s.SERVER_DB).mkdir(parents=True)
    write(tmp_path, k3s.AGENT_MARKER, "cert")  # servers run an agent too
    assert membership(tmp_path) is Membership.SERVER


def test_membership_agent_by_its_signed_kubelet_cert(tmp_path: Path) -> None:
    write(tmp_path, k3s.AGENT_MARKER, "cert")
    assert membership(tmp_path) is Membership.AGENT


def test_membership_ignores_a_db_that_is_not_a_directory(tmp_path: Path) -> None:
    write(tmp_path, k3s.SERVER_DB, "")
    assert membership(tmp_path) is Membership.NONE


# --- merged config ----------------------------------------------------------------------------

# k3s's own fixture, pkg/configfilearg/testdata (data.yaml and data.yaml.d/).
K3S_DATA = 'foo-bar: baz\na-slice:\n- 1\n- "2"\n- ""\n- three\nisempty:\nc: b\nislast: true'
K3S_01 = (
    'foo-bar: get-overriden\na-slice:\n- 1\n- "1.5"\n- "2"\n- ""\n- three\n'
    "b-string: one\nc-slice:\n- one\n- two\nd-slice:\n- one\n- two"
)
K3S_02 = (
    "foo-bar: bar-foo\nb-string+: two\nc-slice+:\n- three\nd-slice:\n- three\n- four\n"
    "e-slice+:\n- one\n- two"
)


def test_merge_matches_k3s_fixture(tmp_path: Path) -> None:
    write(tmp_path, k3s.CONFIG, K3S_DATA)
    write(tmp_path, k3s.DROPIN_DIR + "/01-data.yml", K3S_01)
    write(tmp_path, k3s.DROPIN_DIR + "/02-data.yaml", K3S_02)
    write(tmp_path, k3s.DROPIN_DIR + "/02-data-ignore-this.txt", "foo-bar: ignored\n")
    merged = merged_config(tmp_path)
    assert merged == {
        "foo-bar": "bar-foo",
        "a-slice": [1, "1.5", "2", "", "three"],
        "isempty": None,
        "c": "b",
        "islast": True,
        "b-string": ["one", "two"],
        "c-slice": ["one", "two", "three"],
        "d-slice": ["three", "four"],
        "e-slice": ["one", "two"],
    }
    # k3s emits flags in first-seen key order.
    assert list(merged) == [
        "foo-bar", "a-slice", "isempty", "c", "islast", "b-string", "c-slice", "d-slice", "e-slice",
    ]  # fmt: skip


def test_merge_orders_drop_ins_by_name_bytes(tmp_path: Path) -> None:
    write(tmp_path, k3s.CONFIG, "server: https://config:6443\n")
    write(tmp_path, k3s.DROPIN_DIR + "/9-b.yaml", "server: https://nine:6443\n")
    write(tmp_path, k3s.DROPIN_DIR + "/10-a.yaml", "server: https://ten:6443\n")
    write(tmp_path, k3s.DROPIN_DIR + "/Z.yaml", "node-label+: upper\n")
    write(tmp_path, k3s.DROPIN_DIR + "/a.yaml", "node-label+: lower\n")
    assert merged_config(tmp_path) == {
        "server": "https://nine:6443",
        "node-label": ["upper", "lower"],  # "Z" (0x5a) sorts before "a" (0x61)
    }


def test_merge_reads_yaml_and_yml_in_any_case_and_nothing_else(tmp_path: Path) -> None:
    for name in ("a.YAML", "b.Yml", ".hidden.yaml"):
        write(tmp_path, f"{k3s.DROPIN_DIR}/{name}", f"seen+: {name}\n")
    for name in ("c.yaml.bak", "d.json", "e.yaml~", "f.tmp"):
        write(tmp_path, f"{k3s.DROPIN_DIR}/{name}", "ignored: true\n")
    (tmp_path / k3s.DROPIN_DIR / "dir.yaml").mkdir()
    assert merged_config(tmp_path) == {"seen": [".hidden.yaml", "a.YAML", "b.Yml"]}


def test_merge_without_any_file_is_empty(tmp_path: Path) -> None:
    assert merged_config(tmp_path) == {}


def test_merge_of_drop_ins_alone(tmp_path: Path) -> None:
    write(tmp_path, k3s.DROPIN_DIR + "/20-x.yaml", "write-kubeconfig-mode: '0644'\n")
    assert merged_config(tmp_path) == {"write-kubeconfig-mode": "0644"}


@pytest.mark.parametrize(
    ("first", "then", "expected"),
    [
        ("node-label: a", "node-label+: [b]", ["a", "b"]),
        ("node-label: [a]", "node-label+: b", ["a", "b"]),
        ("flag: true", "flag+: x", ["true", "x"]),
        ("flag: 7", "flag+: [x]", ["7", "x"]),
        ("flag:", "flag+: x", ["x"]),
        ("flag: [a]", "flag: [b]", ["b"]),
        ("other: 1", "flag+: [x]", ["x"]),  # nothing to append to: the value as written
        ("other: 1", "flag+: x", "x"),
    ],
)
def test_merge_append_rules(tmp_path: Path, first: str, then: str, expected: object) -> None:
    write(tmp_path, k3s.CONFIG, first + "\n")
    write(tmp_path, k3s.DROPIN_DIR + "/60-x.yaml", then + "\n")
    assert merged_config(tmp_path)["flag" if "flag" in then else "node-label"] == expected


def test_merge_keeps_repeated_keys_of_one_file(tmp_path: Path) -> None:
    write(tmp_path, k3s.CONFIG, "node-label: [x]\n")
    write(tmp_path, k3s.DROPIN_DIR + "/60-x.yaml", "node-label+: a\nnode-label+: b\n")
    assert merged_config(tmp_path)["node-label"] == ["x", "a", "b"]


def test_merge_can_leave_our_drop_in_out(tmp_path: Path) -> None:
    write(tmp_path, k3s.CONFIG, "token: operator\n")
    write(tmp_path, k3s.OUR_DROPIN, "token: ours\n")
    assert merged_config(tmp_path)["token"] == "ours"
    assert merged_config(tmp_path, include_ours=False)["token"] == "operator"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("token: *K10verysecretvalue\n", "not valid YAML at line 1"),
        ("a: [1, 2\n", "not valid YAML"),
        ("- a\n- b\n", "not a mapping"),
        ("just a string\n", "not a mapping"),
        ("a: !!python/object:os.system x\n", "not valid YAML"),
    ],
)
def test_merge_refuses_malformed_file_naming_it(tmp_path: Path, text: str, reason: str) -> None:
    write(tmp_path, k3s.CONFIG, "cluster-init: true\n")
    bad = write(tmp_path, k3s.DROPIN_DIR + "/30-bad.yaml", text)
    with pytest.raises(K3sConfigError, match=reason) as caught:
        merged_config(tmp_path)
    message = str(caught.value)
    assert message.startswith(str(bad))
    assert "\n" not in message
    assert "verysecret" not in message


def test_merge_refuses_non_utf8_and_oversized_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / k3s.CONFIG
    path.parent.mkdir(parents=True)
    path.write_bytes(b"token: \xff\xfe\n")
    with pytest.raises(K3sConfigError, match="not UTF-8"):
        merged_config(tmp_path)
    path.write_text("a: " + "x" * 100 + "\n")
    monkeypatch.setattr(const, "K3S_CONFIG_FILE_MAX", 64)
    with pytest.raises(K3sConfigError, match="larger than 64 bytes"):
        merged_config(tmp_path)


def test_merge_refuses_an_unreadable_config(tmp_path: Path) -> None:
    (tmp_path / k3s.CONFIG).mkdir(parents=True)  # a directory where k3s expects its file
    with pytest.raises(K3sConfigError, match="cannot read it"):
        merged_config(tmp_path)


def test_merge_of_comments_only_is_empty(tmp_path: Path) -> None:
    write(tmp_path, k3s.CONFIG, "# nothing yet\n")
    write(tmp_path, k3s.DROPIN_DIR + "/10-empty.yaml", "")
    assert merged_config(tmp_path) == {}


# --- release and drop-in ----------------------------------------------------------------------

SECURE = f"K10{CA_SHA}::server:{PASSWORD}"


@pytest.mark.parametrize(
    ("address", "url"),
    [
        ("192.168.1.20", "https://192.168.1.20:6443"),
        ("fd00::0:1", "https://[fd00::1]:6443"),
        ("fe80::1%eth0", "https://[fe80::1%25eth0]:6443"),
        ("sugar-1.local", "https://sugar-1.local:6443"),
    ],
)
def test_api_url(address: str, url: str) -> None:
    assert api_url(address) == url


def test_render_cluster_init() -> None:
    text = render_dropin(Release("cluster-init", token=PASSWORD, node_labels=("role=a",)))
    assert text.startswith("# Written by sugarkube-agent")
    assert yaml.safe_load(text) == {
        "cluster-init": True, "token": PASSWORD, "node-label+": ["role=a"],
    }  # fmt: skip


def test_render_single_server_has_no_cluster_init() -> None:
    assert yaml.safe_load(render_dropin(Release("single", token=PASSWORD))) == {"token": PASSWORD}
    assert yaml.safe_load(render_dropin(Release("single"))) is None


@pytest.mark.parametrize("mode", ["join-server", "join-agent"])
def test_render_join(mode: k3s.Mode) -> None:
    url = api_url("fd00::1")
    text = render_dropin(Release(mode, server_url=url, token=SECURE))
    assert yaml.safe_load(text) == {"server": "https://[fd00::1]:6443", "token": SECURE}


@pytest.mark.parametrize("token", ["pa: ss #x", "'quoted'", "- dash", "&anchor", "K10::x:y"])
def test_render_quotes_any_token(token: str) -> None:
    assert yaml.safe_load(render_dropin(Release("single", token=token)))["token"] == token


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mode": "join-server", "token": SECURE},
        {"mode": "join-agent", "server_url": "http://x:6443", "token": SECURE},
        {"mode": "join-server", "server_url": "https://x:6443"},
        {"mode": "cluster-init", "server_url": "https://x:6443"},
        {"mode": "elect"},
        {"mode": "single", "node_labels": ("a\nb",)},
    ],
)
def test_release_refuses_inconsistent_values(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):  # each message differs; the type is the contract
        Release(**kwargs)  # type: ignore[arg-type]


def test_release_refuses_a_bad_token_without_showing_it() -> None:
    bad = f"K10{CA_SHA[:20]}::server:{PASSWORD}"
    with pytest.raises(TokenError) as caught:
        Release("join-server", server_url="https://x:6443", token=bad)
    assert PASSWORD not in str(caught.value)
    assert PASSWORD not in repr(Release("single", token=PASSWORD))


def test_write_dropin_is_0600_and_merges_after_the_operator(tmp_path: Path) -> None:
    config = write(tmp_path, k3s.CONFIG, "node-label: [zone=a]\ntoken: operator\n")
    other = write(tmp_path, k3s.DROPIN_DIR + "/90-operator.yaml", "write-kubeconfig-mode: '0644'\n")
    os.utime(other, (1_000_000, 1_000_000))
    before = {p: p.read_bytes() for p in (config, other)}
    release = Release("join-server", api_url("10.0.0.1"), SECURE, ("sugarkube/role=server",))
    path = write_dropin(tmp_path, release)
    assert path == tmp_path / k3s.OUR_DROPIN
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert path.read_text() == render_dropin(release)
    assert {p: p.read_bytes() for p in (config, other)} == before
    assert os.stat(other).st_mtime == 1_000_000
    assert sorted(os.listdir(path.parent)) == ["50-sugarkube.yaml", "90-operator.yaml"]
    assert merged_config(tmp_path) == {
        "node-label": ["zone=a", "sugarkube/role=server"],
        "token": SECURE,
        "server": "https://10.0.0.1:6443",
        "write-kubeconfig-mode": "0644",
    }


def test_write_dropin_creates_its_directories_0755(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        write_dropin(tmp_path, Release("cluster-init", token=PASSWORD))
    finally:
        os.umask(old)
    for relative in ("etc", "etc/rancher", "etc/rancher/k3s", k3s.DROPIN_DIR):
        assert stat.S_IMODE(os.stat(tmp_path / relative).st_mode) == 0o755, relative
    assert stat.S_IMODE(os.stat(tmp_path / k3s.OUR_DROPIN).st_mode) == 0o600


def test_write_dropin_is_never_readable_by_others_even_before_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old_umask = os.umask(0)
    seen: list[tuple[int, str]] = []
    real_replace = os.replace

    def spying_replace(src: str | Path, dst: str | Path) -> None:
        seen.append((stat.S_IMODE(os.stat(src).st_mode), Path(src).read_text()))
        assert not Path(src).name.endswith((".yaml", ".yml"))  # k3s would read it
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spying_replace)
    try:
        write_dropin(tmp_path, Release("cluster-init", token=PASSWORD))
    finally:
        os.umask(old_umask)
    assert seen == [(0o600, render_dropin(Release("cluster-init", token=PASSWORD)))]


def test_write_dropin_replaces_ours_and_clears_stale_temporaries(tmp_path: Path) -> None:
    stale = write(tmp_path, f"{k3s.DROPIN_DIR}/.50-sugarkube.yaml.dead.tmp", "token: old\n")
    write_dropin(tmp_path, Release("cluster-init", token=PASSWORD))
    write_dropin(tmp_path, Release("single"))
    assert not stale.exists()
    assert merged_config(tmp_path) == {}
    assert os.listdir(tmp_path / k3s.DROPIN_DIR) == ["50-sugarkube.yaml"]


def test_write_dropin_failure_is_one_error_and_leaves_nothing(tmp_path: Path) -> None:
    write(tmp_path, k3s.DROPIN_DIR, "a file where the directory belongs")
    with pytest.raises(K3sError, match="cannot write"):
        write_dropin(tmp_path, Release("single", token=PASSWORD))
    (tmp_path / k3s.DROPIN_DIR).unlink()
    (tmp_path / k3s.OUR_DROPIN).mkdir(parents=True)  # something is in our file's place
    with pytest.raises(K3sError, match="cannot write") as caught:
        write_dropin(tmp_path, Release("single", token=PASSWORD))
    assert PASSWORD not in str(caught.value)
    assert os.listdir(tmp_path / k3s.DROPIN_DIR) == ["50-sugarkube.yaml"]


def test_write_dropin_leaves_no_copy_of_the_token_whatever_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(fd: int) -> None:
        raise KeyboardInterrupt  # not an OSError: Ctrl-C on a foreground run, a MemoryError

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_dropin(tmp_path, Release("single", token=PASSWORD))
    assert os.listdir(tmp_path / k3s.DROPIN_DIR) == []


def test_remove_dropin(tmp_path: Path) -> None:
    operator = write(tmp_path, k3s.DROPIN_DIR + "/10-operator.yaml", "a: 1\n")
    write_dropin(tmp_path, Release("single"))
    assert remove_dropin(tmp_path) is True
    assert remove_dropin(tmp_path) is False
    assert operator.exists()


# --- wipe -------------------------------------------------------------------------------------


def k3s_node(root: Path) -> dict[str, Path]:
    """A server node's files: k3s state, the operator's config, ours, the node password."""
    for relative in (
        k3s.SERVER_DB + "/state.db", k3s.K3S_STATE + "/server/token",
        k3s.K3S_STATE + "/server/tls/server-ca.crt", k3s.AGENT_MARKER,
        k3s.K3S_STATE + "/data/current/bin/k3s",
    ):  # fmt: skip
        write(root, relative, "x")
    (root / k3s.K3S_STATE / "server/node-token").symlink_to("token")
    write_dropin(root, Release("cluster-init", token=PASSWORD))
    return {
        "config": write(root, k3s.CONFIG, "token: operator\n"),
        "dropin": write(root, k3s.DROPIN_DIR + "/10-operator.yaml", "a: 1\n"),
        "password": write(root, "etc/rancher/node/password", "p"),
        "sugarkube": write(root, "var/lib/sugarkube/salt", "s"),
    }


def test_wipe_removes_state_and_ours_only(tmp_path: Path) -> None:
    kept = k3s_node(tmp_path)
    assert wipe_state(tmp_path) == [k3s.OUR_DROPIN, k3s.K3S_STATE]
    assert not (tmp_path / k3s.K3S_STATE).exists()
    assert not (tmp_path / k3s.OUR_DROPIN).exists()
    assert all(path.exists() for path in kept.values())
    assert membership(tmp_path) is Membership.NONE
    assert merged_config(tmp_path) == {"token": "operator", "a": 1}


def test_wipe_is_idempotent(tmp_path: Path) -> None:
    k3s_node(tmp_path)
    wipe_state(tmp_path)
    assert wipe_state(tmp_path) == []
    assert wipe_state(tmp_path / "never-existed") == []


def test_wipe_empties_a_linked_state_directory_and_keeps_the_link(tmp_path: Path) -> None:
    root, disk = tmp_path / "root", tmp_path / "ssd/k3s"
    (root / "var/lib/rancher").mkdir(parents=True)
    disk.mkdir(parents=True)
    (root / k3s.K3S_STATE).symlink_to(disk)
    write(disk, "server/db/state.db", "x")
    write(disk, "agent/client-kubelet.crt", "x")
    assert sorted(wipe_state(root)) == [k3s.K3S_STATE + "/agent", k3s.K3S_STATE + "/server"]
    assert (root / k3s.K3S_STATE).is_symlink()
    assert disk.is_dir()
    assert list(disk.iterdir()) == []


def test_wipe_leaves_a_link_to_an_absent_disk(tmp_path: Path) -> None:
    (tmp_path / "var/lib/rancher").mkdir(parents=True)
    (tmp_path / k3s.K3S_STATE).symlink_to(tmp_path / "not-mounted")
    assert wipe_state(tmp_path) == []
    assert (tmp_path / k3s.K3S_STATE).is_symlink()


def mountinfo(root: Path, *points: str) -> None:
    lines = [f"{36 + i} 25 0:{40 + i} / {p} rw - tmpfs tmpfs rw" for i, p in enumerate(points)]
    write(root, k3s.MOUNTINFO, "\n".join(lines) + "\n")


def test_wipe_refuses_while_something_is_mounted_inside(tmp_path: Path) -> None:
    k3s_node(tmp_path)
    pod = "/var/lib/rancher/k3s/agent/containerd/io.containerd.grpc.v1.cri/sandboxes/a\\040b/shm"
    mountinfo(tmp_path, "/", "/var/lib/rancher", pod)
    with pytest.raises(K3sError, match="a b/shm is a mount point; stop k3s"):
        wipe_state(tmp_path)
    # Nothing was removed, our drop-in included: the node is as it was.
    assert membership(tmp_path) is Membership.SERVER
    assert (tmp_path / k3s.OUR_DROPIN).exists()


def test_wipe_empties_a_mounted_state_directory(tmp_path: Path) -> None:
    k3s_node(tmp_path)
    mountinfo(tmp_path, "/", "/var/lib/rancher/k3s")
    removed = wipe_state(tmp_path)
    assert removed[0] == k3s.OUR_DROPIN
    assert sorted(removed[1:]) == [f"{k3s.K3S_STATE}/{n}" for n in ("agent", "data", "server")]
    assert (tmp_path / k3s.K3S_STATE).is_dir()
    assert list((tmp_path / k3s.K3S_STATE).iterdir()) == []


def test_agent_only_is_k3s_agent_service_without_an_unmasked_k3s_service(tmp_path: Path) -> None:
    def unit(directory: str, name: str, text: str = "[Service]\nExecStart=/usr/local/bin/k3s\n"):
        path = tmp_path / directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    assert not k3s.agent_only(tmp_path)  # neither: the operator runs k3s some other way
    unit("etc/systemd/system", "k3s-agent.service")  # the installer's agent mode
    assert k3s.agent_only(tmp_path)
    server = unit("lib/systemd/system", "k3s.service")
    assert not k3s.agent_only(tmp_path)
    (tmp_path / "etc/systemd/system/k3s.service").symlink_to("/dev/null")  # masked
    assert k3s.agent_only(tmp_path)
    (tmp_path / "etc/systemd/system/k3s.service").unlink()
    unit("run/systemd/system", "k3s.service", "")  # an empty unit file is masked too
    assert k3s.agent_only(tmp_path)
    assert server.exists()
