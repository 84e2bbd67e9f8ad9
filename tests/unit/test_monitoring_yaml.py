"""deploy/monitoring/: the manifests parse, hold what kube-prometheus-stack needs, and every metric
their PromQL names is one the agent exports (with labels it has); `promtool` checks the rules and,
on series shaped like the agent's, that each alert fires when it should and not before."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from agent.daemon.metrics import Metrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "monitoring"
PROMTOOL = shutil.which("promtool")
JOB = "sugarkube-agent"
RELEASE = "kube-prometheus-stack"
TARGET_LABELS = {"job", "instance", "node"}  # added by Prometheus and our relabelings
PROMETHEUS_METRICS = {"up"}  # made by Prometheus for every target, not by the agent

# PromQL words that may stand where a metric name could; functions are told by their `(`.
KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}
FUNCTIONS = {
    "sum", "max", "min", "avg", "count", "topk", "bottomk", "quantile", "count_values",
    "rate", "increase", "irate", "delta", "histogram_quantile", "vector", "absent",
    "changes", "resets", "time", "clamp_min", "clamp_max",
}  # fmt: skip


def documents() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(DEPLOY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            assert isinstance(doc, dict), f"{path.name}: a document that is not a mapping"
            yield path, doc


def only(kind: str) -> dict[str, Any]:
    found = [doc for _, doc in documents() if doc.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def exported() -> dict[str, set[str]]:
    """Every sample name a busy agent exports -> its label names."""
    metrics = Metrics("0.1.0", "sugar", "dev")
    metrics.discovery(0.1)
    metrics.absence_gate(2.5)
    metrics.wire_proof(0.02)
    metrics.verifier([("cgroup_memory", "fail")])
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


def strip_grafana(expr: str) -> str:
    """Grafana's variables replaced by what they stand for, so the PromQL can be read."""
    expr = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m")
    return re.sub(r"\$\{?\w+\}?", "x", expr)


def selectors(expr: str) -> Iterator[tuple[str, set[str]]]:
    """(name, label names matched) of every `name{...}` and bare `name` in a PromQL expression."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string contents say nothing here
    text = re.sub(r"\[[^\]]*\]", "", text)  # range durations
    text = re.sub(
        r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text
    )
    for match in re.finditer(r"(?<![\w.:])([A-Za-z_:][\w:]*)\s*(\{[^}]*\})?(\s*\()?", text):
        name, matchers, call = match.groups()
        if call:
            assert name in FUNCTIONS, f"unknown PromQL function {name!r} in {expr!r}"
        elif name not in KEYWORDS and not re.fullmatch(r"\d.*|e\d+", name):
            labels = set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", matchers or ""))
            yield name, labels


def check_expr(expr: str, names: dict[str, set[str]]) -> set[str]:
    """The metric names `expr` uses, asserting each is exported with the labels it matches."""
    used = set()
    for name, labels in selectors(strip_grafana(expr)):
        used.add(name)
        if name in PROMETHEUS_METRICS:
            continue
        assert name in names, f"{name!r} in {expr!r} is not a metric the agent exports"
        unknown = labels - names[name] - TARGET_LABELS
        assert not unknown, f"{expr!r} matches labels {unknown} that {name} does not have"
    return used


def dashboard() -> dict[str, Any]:
    config_map = only("ConfigMap")
    (text,) = config_map["data"].values()
    parsed = json.loads(text)
    assert isinstance(parsed, dict)
    return parsed


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


# -- the manifests ------------------------------------------------------------------------------


def test_every_yaml_parses_and_names_its_kind() -> None:
    kinds = sorted((doc["apiVersion"], doc["kind"]) for _, doc in documents())
    assert kinds == [
        ("kustomize.config.k8s.io/v1beta1", "Kustomization"),
        ("monitoring.coreos.com/v1", "PrometheusRule"),
        ("monitoring.coreos.com/v1alpha1", "ScrapeConfig"),
        ("v1", "ConfigMap"),
    ]
    for path, doc in documents():
        if doc["kind"] != "Kustomization":
            assert doc["metadata"]["name"], path.name
            assert doc["metadata"]["namespace"], path.name


def test_the_kustomization_lists_every_manifest() -> None:
    listed = set(only("Kustomization")["resources"])
    assert listed == {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml"}


def test_the_scrape_config_targets_each_nodes_internal_ip_on_9469() -> None:
    scrape = only("ScrapeConfig")
    assert scrape["metadata"]["labels"]["release"] == RELEASE
    spec = scrape["spec"]
    assert spec["kubernetesSDConfigs"] == [{"role": "Node"}]
    assert spec.get("metricsPath", "/metrics") == "/metrics"
    relabel = spec["relabelings"]
    actions = {r.get("action", "replace") for r in relabel}
    assert actions <= {"replace", "keep", "drop", "labelmap"}
    to_address = [r for r in relabel if r.get("targetLabel") == "__address__"]
    assert to_address
    for rule in to_address:
        assert rule["sourceLabels"] == ["__meta_kubernetes_node_address_InternalIP"]
        assert rule["replacement"].endswith(":9469")
    job = [r for r in relabel if r.get("targetLabel") == "job"]
    assert [r["replacement"] for r in job] == [JOB]
    assert any(r.get("targetLabel") == "node" for r in relabel)


@pytest.mark.parametrize(
    ("internal_ip", "address"),
    [("192.168.1.21", "192.168.1.21:9469"), ("fd00::21", "[fd00::21]:9469")],
)
def test_the_relabelings_make_the_right_address(internal_ip: str, address: str) -> None:
    labels = {"__meta_kubernetes_node_address_InternalIP": internal_ip, "__address__": "x:10250"}
    for rule in only("ScrapeConfig")["spec"]["relabelings"]:
        source = ";".join(labels.get(s, "") for s in rule.get("sourceLabels", []))
        match = re.fullmatch(rule.get("regex", "(.*)"), source)
        action = rule.get("action", "replace")
        if action == "keep":
            assert match, rule
        elif action == "replace" and match:
            replacement = rule.get("replacement", "${1}")
            labels[rule["targetLabel"]] = re.sub(r"\$\{(\d+)\}", r"\\\1", replacement)
            labels[rule["targetLabel"]] = match.expand(labels[rule["targetLabel"]])
    assert labels["__address__"] == address
    assert labels["job"] == JOB


def test_the_dashboard_config_map_carries_the_sidecar_label() -> None:
    config_map = only("ConfigMap")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    (key,) = config_map["data"]
    assert key.endswith(".json")


def test_the_rules_carry_the_release_label_and_the_four_required_alerts() -> None:
    rule = only("PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == RELEASE
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert {
        "SugarkubeGateNotReleased", "SugarkubeAvahiDown", "SugarkubeVerifierCheckFailing",
        "SugarkubeJoinRefused",
    } <= alerts.keys()  # fmt: skip
    assert alerts["SugarkubeGateNotReleased"]["for"] == "15m"
    for name, alert in alerts.items():
        assert alert["labels"]["severity"] in {"info", "warning", "critical"}, name
        assert alert["annotations"]["summary"], name
        assert alert["annotations"]["description"], name


# -- the PromQL ---------------------------------------------------------------------------------


def test_every_metric_in_the_rules_is_exported_with_its_labels() -> None:
    names = exported()
    used: set[str] = set()
    for group in only("PrometheusRule")["spec"]["groups"]:
        for rule in group["rules"]:
            used |= check_expr(rule["expr"], names)
    assert {
        "sugarkube_gate_released", "sugarkube_avahi_up", "sugarkube_verifier_check",
        "sugarkube_join_refused_total",
    } <= used  # fmt: skip


def test_every_metric_in_the_dashboard_is_exported_with_its_labels() -> None:
    names = exported()
    board = dashboard()
    exprs = [t["expr"] for p in panels(board) for t in p.get("targets", [])]
    assert exprs
    used = set().union(*(check_expr(expr, names) for expr in exprs))
    assert "sugarkube_mdns_discovery_duration_seconds_bucket" in used
    for variable in board["templating"]["list"]:
        if variable["type"] != "query":
            continue
        # Grafana's label_values(selector, label), not PromQL
        found = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["definition"])
        assert found, variable["definition"]
        (metric,) = check_expr(found[1], names)
        assert found[2] in names[metric] | TARGET_LABELS


def test_the_name_reader_catches_a_misspelt_metric_and_label() -> None:
    names = exported()
    with pytest.raises(AssertionError, match="sugarkube_gate_relased"):
        check_expr('sum by (node) (sugarkube_gate_relased{job="x"})', names)
    with pytest.raises(AssertionError, match="rol"):
        check_expr('sugarkube_mdns_peers{rol="server"}', names)
    with pytest.raises(AssertionError, match="ratte"):
        check_expr("ratte(process_cpu_seconds_total[5m])", names)
    assert check_expr(
        'histogram_quantile(0.95, sum by (le) (rate(sugarkube_wire_proof_duration_seconds_bucket'
        '{job="a", le=~"1e3|0.5"}[$__rate_interval]))) > 1e-3 and on (node) up == 1',
        names,
    ) == {"sugarkube_wire_proof_duration_seconds_bucket", "up"}


# -- the dashboard ------------------------------------------------------------------------------


def test_the_dashboard_has_the_panels_an_operator_needs() -> None:
    board = dashboard()
    assert board["uid"]
    assert board["title"]

    def shown(kind: set[str], metric: str) -> list[dict[str, Any]]:
        return [
            p for p in panels(board)
            if p["type"] in kind and any(metric in t["expr"] for t in p.get("targets", []))
        ]  # fmt: skip

    latency = shown({"heatmap"}, "sugarkube_mdns_discovery_duration_seconds_bucket")
    assert latency
    assert latency[0]["targets"][0]["format"] == "heatmap"
    assert shown({"timeseries"}, "histogram_quantile(0.95, sum by (le) (increase(sugarkube_mdns")
    gate = shown({"state-timeline", "timeseries", "table"}, "sugarkube_gate_released")
    assert gate
    assert "{{node}}" in gate[0]["targets"][0]["legendFormat"]
    peers = shown({"timeseries", "bargauge", "table"}, "sugarkube_mdns_peers")
    assert peers
    assert "{{role}}" in peers[0]["targets"][0]["legendFormat"]
    assert shown({"table"}, "sugarkube_verifier_check")


def test_the_dashboard_panels_do_not_overlap_and_have_unique_ids() -> None:
    board = dashboard()
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in panels(board):
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        xs, ys = range(g["x"], g["x"] + g["w"]), range(g["y"], g["y"] + g["h"])
        mine = {(x, y) for x in xs for y in ys}
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine


# -- promtool -----------------------------------------------------------------------------------


def rule_file(tmp_path: Path) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": only("PrometheusRule")["spec"]["groups"]}))
    return path


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.skipif(PROMTOOL is None, reason="promtool absent: apt-get install prometheus")
def test_promtool_accepts_the_rules(tmp_path: Path) -> None:
    checked = promtool("check", "rules", str(rule_file(tmp_path)))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout


def expected(alert: str, labels: dict[str, str]) -> dict[str, Any]:
    """An alert as promtool reports it: the rule's labels and its annotations filled in."""
    rules = {r["alert"]: r for g in only("PrometheusRule")["spec"]["groups"] for r in g["rules"]}
    rule = rules[alert]
    fill = {
        k: re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m.group(1)], v)
        for k, v in rule["annotations"].items()
    }
    return {"exp_labels": {**labels, **rule["labels"]}, "exp_annotations": fill}


@pytest.mark.skipif(PROMTOOL is None, reason="promtool absent: apt-get install prometheus")
def test_each_alert_fires_on_the_agents_series_when_it_should(tmp_path: Path) -> None:
    node = {"job": JOB, "instance": "pi1", "node": "pi1"}

    def series(name: str, values: str, **labels: str) -> dict[str, str]:
        text = ", ".join(f'{k}="{v}"' for k, v in {**node, **labels}.items())
        return {"series": f"{name}{{{text}}}", "values": values}

    tests = [
        {
            "interval": "1m",
            "input_series": [
                series("sugarkube_gate_released", "0x30"),
                series("sugarkube_avahi_up", "1x3 0x10"),
                series("sugarkube_verifier_check", "1x10", check="cgroup_memory", status="fail"),
                series("sugarkube_verifier_check", "0x10", check="cgroup_memory", status="pass"),
                series("sugarkube_join_refused_total", "0x5 1 1x10", reason="ca_mismatch"),
                series("sugarkube_join_refused_total", "0x30", reason="unreachable"),
                series("sugarkube_join_stalled", "0x3 1x10"),
                series("up", "1x3 0x10"),
                series("sugarkube_degraded", "0x2 1x20", what="metrics"),
                series("sugarkube_degraded", "0x30", what="config"),
                series("sugarkube_cluster_cas", "1x3 2x10"),
            ],
            "alert_rule_test": [
                {"eval_time": "14m", "alertname": "SugarkubeGateNotReleased", "exp_alerts": []},
                {"eval_time": "4m", "alertname": "SugarkubeSplitBrain", "exp_alerts": []},
                {
                    "eval_time": "6m", "alertname": "SugarkubeSplitBrain",
                    "exp_alerts": [expected("SugarkubeSplitBrain", node)],
                },
                {
                    "eval_time": "16m", "alertname": "SugarkubeGateNotReleased",
                    "exp_alerts": [expected("SugarkubeGateNotReleased", node)],
                },
                {"eval_time": "7m", "alertname": "SugarkubeAvahiDown", "exp_alerts": []},
                {
                    "eval_time": "9m", "alertname": "SugarkubeAvahiDown",
                    "exp_alerts": [expected("SugarkubeAvahiDown", node)],
                },
                {
                    "eval_time": "6m", "alertname": "SugarkubeVerifierCheckFailing",
                    "exp_alerts": [expected(
                        "SugarkubeVerifierCheckFailing",
                        {**node, "check": "cgroup_memory", "status": "fail"},
                    )],
                },
                {"eval_time": "5m", "alertname": "SugarkubeJoinRefused", "exp_alerts": []},
                {
                    "eval_time": "8m", "alertname": "SugarkubeJoinRefused",
                    "exp_alerts": [expected(
                        "SugarkubeJoinRefused", {**node, "reason": "ca_mismatch"}
                    )],
                },
                {"eval_time": "4m", "alertname": "SugarkubeJoinStalled", "exp_alerts": []},
                {
                    "eval_time": "6m", "alertname": "SugarkubeJoinStalled",
                    "exp_alerts": [expected("SugarkubeJoinStalled", node)],
                },
                {"eval_time": "11m", "alertname": "SugarkubeDegraded", "exp_alerts": []},
                {
                    "eval_time": "13m", "alertname": "SugarkubeDegraded",
                    "exp_alerts": [expected("SugarkubeDegraded", {**node, "what": "metrics"})],
                },
                {
                    "eval_time": "9m", "alertname": "SugarkubeAgentDown",
                    "exp_alerts": [expected("SugarkubeAgentDown", node)],
                },
            ],
        }
    ]  # fmt: skip
    rules = rule_file(tmp_path)
    spec = tmp_path / "rules_test.yaml"
    spec.write_text(yaml.safe_dump({"rule_files": [rules.name], "tests": tests}))
    tested = promtool("test", "rules", str(spec))
    assert tested.returncode == 0, tested.stdout + tested.stderr
