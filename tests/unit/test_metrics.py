"""The metrics facade: what a scrape shows after each event, read back with the client's parser."""

from __future__ import annotations

import math

import prometheus_client
import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import metrics as client_metrics
from prometheus_client.parser import text_string_to_metric_families

from agent import const
from agent.daemon.metrics import PHASES, ROLES, STATUSES, Metrics

Labels = frozenset[tuple[str, str]]

DESIGN_FAMILIES = {  # DESIGN.md §A "Observability", as families in the text format
    "sugarkube_mdns_discovery_duration_seconds": "histogram",
    "sugarkube_absence_gate_duration_seconds": "histogram",
    "sugarkube_wire_proof_duration_seconds": "histogram",
    "sugarkube_gate_released": "gauge",
    "sugarkube_node_phase": "gauge",
    "sugarkube_mdns_peers": "gauge",
    "sugarkube_avahi_up": "gauge",
    "sugarkube_link_up": "gauge",  # issue 5: "when the link goes down, say so in metrics"
    "sugarkube_verifier_check": "gauge",
    "sugarkube_join_refused_total": "counter",
    "sugarkube_join_stalled": "gauge",  # issue 10 rule 5: joiners waiting on a silent bootstrapper
    "sugarkube_agent_info": "gauge",
    "sugarkube_degraded": "gauge",  # issue 11: what the gate does not wait on, failing
    "sugarkube_adverts_ignored_total": "counter",  # issue 12: forged, replayed, unusable adverts
    "sugarkube_cluster_cas": "gauge",  # issue 12: above 1, a split brain
}

HISTOGRAMS = {  # facade method -> histogram
    "discovery": "sugarkube_mdns_discovery_duration_seconds",
    "absence_gate": "sugarkube_absence_gate_duration_seconds",
    "wire_proof": "sugarkube_wire_proof_duration_seconds",
}


def scrape(metrics: Metrics) -> dict[tuple[str, Labels], float]:
    """Every sample of a render, keyed by sample name and label set."""
    text = metrics.render().decode("utf-8")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def series(metrics: Metrics, name: str) -> dict[Labels, float]:
    """The samples of one name, keyed by label set."""
    return {labels: v for (n, labels), v in scrape(metrics).items() if n == name}


def one(name: str, **labels: str) -> tuple[str, Labels]:
    return name, frozenset(labels.items())


def types(metrics: Metrics) -> dict[str, str]:
    """`# TYPE` lines of a render: family name -> type."""
    lines = metrics.render().decode().splitlines()
    return {ln.split()[2]: ln.split()[3] for ln in lines if ln.startswith("# TYPE ")}


@pytest.fixture
def metrics() -> Metrics:
    return Metrics("0.1.0", "sugar", "dev")


def test_the_families_are_exactly_the_designs_plus_the_process_collector(metrics: Metrics) -> None:
    found = types(metrics)
    ours = {name: kind for name, kind in found.items() if not name.startswith("process_")}
    assert ours == DESIGN_FAMILIES
    assert {"process_resident_memory_bytes", "process_cpu_seconds_total"} <= found.keys()


def test_a_fresh_daemon_shows_every_phase_role_and_reason_at_zero(metrics: Metrics) -> None:
    samples = scrape(metrics)
    assert {p: samples[one("sugarkube_node_phase", phase=p)] for p in PHASES} == dict.fromkeys(
        PHASES, 0.0
    )
    assert {r: samples[one("sugarkube_mdns_peers", role=r)] for r in ROLES} == dict.fromkeys(
        ROLES, 0.0
    )
    refused = series(metrics, "sugarkube_join_refused_total")
    assert {dict(k)["reason"] for k in refused} == {
        "unreachable", "tls_error", "ca_mismatch", "bad_cacerts", "verify_failed",
        "unauthenticated",
    }
    assert set(refused.values()) == {0.0}
    assert samples[one("sugarkube_gate_released")] == 0.0
    assert samples[one("sugarkube_join_stalled")] == 0.0
    assert samples[one("sugarkube_avahi_up")] == 0.0
    assert samples[one("sugarkube_mdns_discovery_duration_seconds_count")] == 0.0
    assert series(metrics, "sugarkube_verifier_check") == {}
    info = one("sugarkube_agent_info", version="0.1.0", cluster="sugar", env="dev")
    assert samples[info] == 1.0


def test_the_phases_are_the_documented_ones() -> None:
    assert set(PHASES) == {
        "member", "discover", "elect", "bootstrap", "bound", "join", "ineligible", "released",
        "serving", "wiped",
    }
    assert set(ROLES) == {"candidate", "bootstrap", "server", "agent"}
    assert set(STATUSES) == {"pass", "fail", "skip"}


def test_no_created_series_even_where_the_client_would_emit_them(
    metrics: Metrics, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_metrics, "_use_created", True)  # the client's default in 0.16
    fresh = Metrics("0.1.0", "sugar", "dev")
    for m in (metrics, fresh):
        m.discovery(0.2)
        m.join_refused("ca_mismatch")
        assert b"_created" not in m.render()


def test_the_global_registry_is_left_alone(metrics: Metrics) -> None:
    Metrics("0.2.0", "other", "prod")  # a second instance registers nothing twice
    names = {m.name for m in prometheus_client.REGISTRY.collect()}
    assert not any(name.startswith("sugarkube_") for name in names)


def test_a_discovery_lands_in_its_bucket(metrics: Metrics) -> None:
    metrics.discovery(0.09)
    buckets = {
        dict(k)["le"]: v
        for k, v in series(metrics, "sugarkube_mdns_discovery_duration_seconds_bucket").items()
    }
    assert buckets["0.05"] == 0.0
    assert buckets["0.1"] == buckets["+Inf"] == 1.0
    samples = scrape(metrics)
    assert samples[one("sugarkube_mdns_discovery_duration_seconds_sum")] == pytest.approx(0.09)


def test_the_discovery_buckets_span_10_ms_to_10_s(metrics: Metrics) -> None:
    les = {
        dict(k)["le"] for k in series(metrics, "sugarkube_mdns_discovery_duration_seconds_bucket")
    }
    bounds = sorted(float(le) for le in les if le != "+Inf")
    assert bounds[0] == 0.01
    assert bounds[-1] == 10.0


@given(
    st.lists(st.floats(min_value=0, max_value=1e6, allow_nan=False), min_size=1, max_size=20),
    st.sampled_from(["discovery", "absence_gate", "wire_proof"]),
)
def test_each_histogram_counts_and_sums_its_observations(values: list[float], kind: str) -> None:
    metrics = Metrics("0.1.0", "sugar", "dev")
    for value in values:
        getattr(metrics, kind)(value)
    name = HISTOGRAMS[kind]
    samples = scrape(metrics)
    assert samples[one(f"{name}_count")] == len(values)
    assert samples[one(f"{name}_sum")] == pytest.approx(math.fsum(values))
    others = set(HISTOGRAMS.values()) - {name}
    assert all(samples[one(f"{other}_count")] == 0 for other in others)


@pytest.mark.parametrize("bad", [-0.001, math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("kind", ["discovery", "absence_gate", "wire_proof"])
def test_a_duration_that_is_no_duration_is_refused(metrics: Metrics, kind: str, bad: float) -> None:
    with pytest.raises(ValueError, match="duration"):
        getattr(metrics, kind)(bad)
    counts = {name: v for (name, _), v in scrape(metrics).items() if name.endswith("_count")}
    assert len(counts) == 3
    assert set(counts.values()) == {0.0}


def test_gate_and_avahi_follow_their_events(metrics: Metrics) -> None:
    metrics.gate_released(True)
    metrics.avahi_up(True)
    samples = scrape(metrics)
    assert samples[one("sugarkube_gate_released")] == 1.0
    assert samples[one("sugarkube_avahi_up")] == 1.0
    metrics.avahi_up(False)
    assert scrape(metrics)[one("sugarkube_avahi_up")] == 0.0
    metrics.link_up(False)
    assert scrape(metrics)[one("sugarkube_link_up")] == 0.0
    metrics.link_up(True)
    assert scrape(metrics)[one("sugarkube_link_up")] == 1.0


@given(st.lists(st.sampled_from(PHASES), min_size=1, max_size=12))
def test_exactly_the_last_phase_is_one(phases: list[str]) -> None:
    metrics = Metrics("0.1.0", "sugar", "dev")
    for phase in phases:
        metrics.phase(phase)
    shown = {dict(k)["phase"]: v for k, v in series(metrics, "sugarkube_node_phase").items()}
    assert shown == {p: (1.0 if p == phases[-1] else 0.0) for p in PHASES}


def test_an_unknown_phase_is_refused_and_changes_nothing(metrics: Metrics) -> None:
    metrics.phase("join")
    with pytest.raises(ValueError, match="unknown phase 'starting'"):
        metrics.phase("starting")
    assert series(metrics, "sugarkube_node_phase") == {
        frozenset({("phase", p)}): (1.0 if p == "join" else 0.0) for p in PHASES
    }


def test_peers_missing_roles_are_zero_and_a_later_count_replaces(metrics: Metrics) -> None:
    metrics.peers({"server": 2, "candidate": 1})
    metrics.peers({"server": 3})
    shown = {dict(k)["role"]: v for k, v in series(metrics, "sugarkube_mdns_peers").items()}
    assert shown == {"candidate": 0.0, "bootstrap": 0.0, "server": 3.0, "agent": 0.0}


@pytest.mark.parametrize("counts", [{"server": 1, "leader": 1}, {"server": 1, "agent": -1}])
def test_bad_peer_counts_are_refused_and_change_nothing(
    metrics: Metrics, counts: dict[str, int]
) -> None:
    metrics.peers({"bootstrap": 4})
    with pytest.raises(ValueError, match=r"unknown role|negative"):
        metrics.peers(counts)
    shown = {dict(k)["role"]: v for k, v in series(metrics, "sugarkube_mdns_peers").items()}
    assert shown == {"candidate": 0.0, "bootstrap": 4.0, "server": 0.0, "agent": 0.0}


def checks(metrics: Metrics) -> dict[str, dict[str, float]]:
    """check -> status -> value."""
    out: dict[str, dict[str, float]] = {}
    for labels, value in series(metrics, "sugarkube_verifier_check").items():
        got = dict(labels)
        out.setdefault(got["check"], {})[got["status"]] = value
    return out


def test_each_check_shows_its_status_one_hot(metrics: Metrics) -> None:
    metrics.verifier([("cgroup_memory", "pass"), ("k3s_node_ready", "fail"), ("time_sync", "skip")])
    assert checks(metrics) == {
        "cgroup_memory": {"pass": 1.0, "fail": 0.0, "skip": 0.0},
        "k3s_node_ready": {"pass": 0.0, "fail": 1.0, "skip": 0.0},
        "time_sync": {"pass": 0.0, "fail": 0.0, "skip": 1.0},
    }


def test_a_later_run_replaces_the_checks_and_drops_vanished_ones(metrics: Metrics) -> None:
    metrics.verifier([("cgroup_memory", "fail"), ("my-plugin", "fail")])
    metrics.verifier([("cgroup_memory", "pass")])
    assert checks(metrics) == {"cgroup_memory": {"pass": 1.0, "fail": 0.0, "skip": 0.0}}


def test_a_bad_status_is_refused_and_the_last_run_stays(metrics: Metrics) -> None:
    metrics.verifier([("cgroup_memory", "pass")])
    with pytest.raises(ValueError, match="unknown status 'ok'"):
        metrics.verifier([("time_sync", "pass"), ("cgroup_memory", "ok")])
    assert checks(metrics) == {"cgroup_memory": {"pass": 1.0, "fail": 0.0, "skip": 0.0}}


def test_checks_past_the_cap_are_not_exported(
    metrics: Metrics, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(const, "METRICS_CHECKS_MAX", 2)
    metrics.verifier([("a", "pass"), ("b", "fail"), ("c", "skip"), ("a", "fail")])
    assert checks(metrics) == {
        "a": {"pass": 0.0, "fail": 1.0, "skip": 0.0},  # a repeated check: the later status wins
        "b": {"pass": 0.0, "fail": 1.0, "skip": 0.0},
    }


@given(st.dictionaries(st.text(max_size=40), st.sampled_from(STATUSES), max_size=8))
def test_any_check_name_survives_the_exposition(named: dict[str, str]) -> None:
    metrics = Metrics("0.1.0", "sugar", "dev")
    metrics.verifier(list(named.items()))
    shown = checks(metrics)
    assert {name: max(row, key=row.__getitem__) for name, row in shown.items()} == named


def test_refusals_count_by_reason(metrics: Metrics) -> None:
    for reason in ("ca_mismatch", "ca_mismatch", "unreachable"):
        metrics.join_refused(reason)
    refused = {
        dict(k)["reason"]: v for k, v in series(metrics, "sugarkube_join_refused_total").items()
    }
    assert refused["ca_mismatch"] == 2.0
    assert refused["unreachable"] == 1.0
    assert refused["tls_error"] == 0.0


def test_reasons_past_the_cap_count_as_other(
    metrics: Metrics, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(const, "METRICS_REASONS_MAX", 7)  # the 6 known reasons, then one more
    for reason in ("no_address", "weird-1", "weird-2", "weird-2", "no_address"):
        metrics.join_refused(reason)
    refused = {
        dict(k)["reason"]: v for k, v in series(metrics, "sugarkube_join_refused_total").items()
    }
    assert refused["no_address"] == 2.0
    assert refused["other"] == 3.0
    assert "weird-1" not in refused


def test_info_labels_are_escaped_not_broken() -> None:
    metrics = Metrics('0.1.0+"dirty"\n', "sugar", "dev")
    info = one("sugarkube_agent_info", version='0.1.0+"dirty"\n', cluster="sugar", env="dev")
    assert scrape(metrics)[info] == 1.0


def test_a_burst_of_scrapes_shares_one_render_until_an_event(metrics: Metrics) -> None:
    first = metrics.render()
    assert metrics.render() is first
    metrics.avahi_up(True)
    assert b"sugarkube_avahi_up 1.0" in metrics.render()


def test_without_reuse_every_scrape_renders_afresh(
    metrics: Metrics, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(const, "METRICS_RENDER_REUSE", 0.0)
    assert metrics.render() is not metrics.render()
