"""docker-compose stacks, validated structurally (Docker does not run here).

The configs the compose stack mounts must be the ones the tests run with real binaries, with
only the host names changed: every check below exists to keep them from drifting apart, and to
keep ports, service names and mounts consistent across the files. docker-compose.cluster.yml
(three replicas on etcd) is held to the single-node stack the same way: its replicas' configs
pass the project's own loader and differ from deploy/compose/config.yml only by a cluster:
section, its Prometheus config from deploy/compose/prometheus.yml only by the scrape targets,
and promtool accepts both Prometheus configs. (tests/test_dashboards.py runs the cluster's
Prometheus config against real replicas.)
"""

from __future__ import annotations

import importlib.util
import json
import posixpath
import re
import subprocess
import threading
import urllib.request
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from exporter.config import load_config
from exporter.rules import render_texts
from tests.tools import ROOT, require_binary

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
EXAMPLE = ROOT / "examples" / "ha-exporter.yml"
COMPOSE_CONFIG = ROOT / "deploy" / "compose" / "config.yml"

#: Host names of the compose services, for the files that exist in both variants.
COMPOSE_HOSTS = {
    "127.0.0.1:9108": "exporter:9108",
    "127.0.0.1:9093": "alertmanager:9093",
    "127.0.0.1:9090": "prometheus:9090",
    "127.0.0.1:9099": "oncall:9099",
}
#: (canonical file, compose variant): equal after COMPOSE_HOSTS, header comments aside.
VARIANTS = [
    ("deploy/prometheus/prometheus.yml", "deploy/compose/prometheus.yml"),
    ("deploy/alertmanager/alertmanager.yml", "deploy/compose/alertmanager.yml"),
]


def _mounts(service: str, services: dict[str, Any] = SERVICES) -> list[tuple[str, str]]:
    """Bind mounts of a service as (host path, container path); named volumes are left out."""
    out = []
    for volume in services[service].get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            out.append((source, target))
    return out


def _mounted(service: str, container_path: str, services: dict[str, Any] = SERVICES) -> Path:
    """The repository file a service sees at ``container_path``."""
    for source, target in _mounts(service, services):
        if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
            return (ROOT / source / container_path[len(target):].lstrip("/")).resolve()
    raise AssertionError(f"{service} mounts nothing at {container_path}")


def _ports(service: str, services: dict[str, Any] = SERVICES) -> dict[int, int]:
    """Published ports as {container port: host port}."""
    out = {}
    for spec in services[service].get("ports", []):
        parts = str(spec).split(":")  # [ip:]host:container or container
        out[int(parts[-1])] = int(parts[-2] if len(parts) > 1 else parts[-1])
    return out


def _flag(command: list[str], name: str) -> str | None:
    for i, arg in enumerate(command):
        if arg == name:
            return command[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _body(text: str) -> str:
    """A config without its leading comment block (which says which variant it is)."""
    lines = text.splitlines(keepends=True)
    while lines and (lines[0].startswith("#") or not lines[0].strip()):
        lines.pop(0)
    return "".join(lines)


def test_the_stack_has_every_service() -> None:
    assert set(SERVICES) == {
        "exporter", "master-a", "master-b", "master-c", "prometheus", "alertmanager", "oncall",
        "grafana",
    }
    for name, service in SERVICES.items():
        for dep in service.get("depends_on", []):
            assert dep in SERVICES, f"{name} depends on unknown service {dep}"


def test_every_bind_mount_exists() -> None:
    for name in SERVICES:
        for source, _ in _mounts(name):
            assert (ROOT / source).exists(), f"{name} mounts missing {source}"


@pytest.mark.parametrize("canonical,variant", VARIANTS)
def test_compose_configs_differ_from_the_tested_ones_only_in_host_names(
        canonical: str, variant: str) -> None:
    text = _body((ROOT / canonical).read_text())
    for local, compose in COMPOSE_HOSTS.items():
        text = text.replace(local, compose)
    assert _body((ROOT / variant).read_text()) == text, (
        f"{variant} drifted from {canonical}: edit both (only host names may differ)")


def test_compose_exporter_config_matches_the_example_except_addresses() -> None:
    example = yaml.safe_load(EXAMPLE.read_text())
    compose = yaml.safe_load(COMPOSE_CONFIG.read_text())
    assert compose["listen"] == {"host": "0.0.0.0", "port": example["listen"]["port"]}
    for i, (m_ex, m_co) in enumerate(zip(example["masters"], compose["masters"], strict=True)):
        url = urlsplit(m_co["url"])
        assert url.hostname == m_co["name"], f"masters[{i}] reached by its service name"
        assert url.port == urlsplit(m_ex["url"]).port
        assert {**m_co, "url": m_ex["url"]} == m_ex
    assert urlsplit(compose["alertmanager"]["url"]).hostname == "alertmanager"
    addresses = {"listen", "masters", "state_path", "alertmanager"}
    assert {k: v for k, v in compose.items() if k not in addresses} == {
        k: v for k, v in example.items() if k not in addresses}


def test_compose_exporter_config_renders_the_checked_in_rules() -> None:
    assert render_texts(load_config(COMPOSE_CONFIG)) == render_texts(load_config(EXAMPLE))


def test_exporter_service_runs_the_contract_command_on_its_config() -> None:
    exporter = SERVICES["exporter"]
    command = exporter["command"]
    assert command[:1] == ["run"]
    config_path = _flag(command, "--config")
    assert _mounted("exporter", config_path) == COMPOSE_CONFIG.resolve()
    port = load_config(COMPOSE_CONFIG).listen.port
    assert port in _ports("exporter")
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", dockerfile, re.M)
    assert re.search(r"pip install \.", dockerfile)
    assert f"EXPOSE {port}" in dockerfile
    assert '["run", "--config", "/etc/ha-exporter/config.yml"]' in dockerfile
    assert config_path == "/etc/ha-exporter/config.yml"
    assert "HA_EXPORTER_TOKEN" in exporter["environment"]


def test_master_services_match_the_exporter_config() -> None:
    cfg = load_config(COMPOSE_CONFIG)
    for master in cfg.masters:
        service = SERVICES[master.name]
        command = service["command"]
        assert command[0] == "master"
        assert _flag(command, "--name") == master.name
        port = urlsplit(master.url).port
        assert _flag(command, "--port") == str(port)
        assert port in _ports(master.name)
        assert _flag(command, "--region") == master.region
        assert (_flag(command, "--role") or "active") == master.role
        assert _flag(command, "--host") == "0.0.0.0", "reachable from the other containers"


def test_prometheus_scrapes_the_exporter_and_alerts_the_alertmanager() -> None:
    command = SERVICES["prometheus"]["command"]
    config_path = _flag(command, "--config.file")
    prom_file = _mounted("prometheus", config_path)
    assert prom_file == (ROOT / "deploy/compose/prometheus.yml").resolve()
    prom = yaml.safe_load(prom_file.read_text())
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    (target,) = jobs["ha-exporter"]["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host == "exporter" and int(port) == load_config(COMPOSE_CONFIG).listen.port
    (am_target,) = prom["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    am_host, am_port = am_target.split(":")
    assert am_host == "alertmanager" and int(am_port) in _ports("alertmanager")
    assert int(jobs["prometheus"]["static_configs"][0]["targets"][0].split(":")[1]) in _ports(
        "prometheus")
    # rule_files resolve, inside the container, to the mounted alert_rules/
    for pattern in prom["rule_files"]:
        container_glob = posixpath.normpath(posixpath.join(posixpath.dirname(config_path),
                                                           pattern))
        host_dir = _mounted("prometheus", posixpath.dirname(container_glob))
        assert host_dir == (ROOT / "alert_rules").resolve()
        assert list(host_dir.glob(posixpath.basename(container_glob)))


def test_alertmanager_delivers_to_the_oncall_service() -> None:
    command = SERVICES["alertmanager"]["command"]
    am_file = _mounted("alertmanager", _flag(command, "--config.file"))
    assert am_file == (ROOT / "deploy/compose/alertmanager.yml").resolve()
    oncall_port = int(_flag(SERVICES["oncall"]["command"], "--port"))
    assert oncall_port in _ports("oncall")
    am = yaml.safe_load(am_file.read_text())
    urls = [hook["url"] for r in am["receivers"] for hook in r.get("webhook_configs", [])]
    assert urls
    for url in urls:
        parts = urlsplit(url)
        assert (parts.hostname, parts.port) == ("oncall", oncall_port), url
    script = _mounted("oncall", SERVICES["oncall"]["command"][1])
    assert script == (ROOT / "deploy/oncall/receiver.py").resolve()


def test_grafana_is_provisioned_with_the_datasource_and_dashboards() -> None:
    provisioning = _mounted("grafana", "/etc/grafana/provisioning")
    (ds,) = yaml.safe_load((provisioning / "datasources/prometheus.yml").read_text())[
        "datasources"]
    url = urlsplit(ds["url"])
    assert url.hostname == "prometheus" and url.port in _ports("prometheus")
    (provider,) = yaml.safe_load((provisioning / "dashboards/ha-exporter.yml").read_text())[
        "providers"]
    dashboards_dir = _mounted("grafana", provider["options"]["path"])
    assert dashboards_dir == (ROOT / "dashboards").resolve()
    assert list(dashboards_dir.glob("*.json"))
    home = SERVICES["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert _mounted("grafana", home).is_file()


def test_published_ports_are_unique() -> None:
    published = [host for name in SERVICES for host in _ports(name).values()]
    assert len(published) == len(set(published))


# --- the on-call stand-in -------------------------------------------------------------------

def _load_receiver() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "oncall_receiver", ROOT / "deploy/oncall/receiver.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_oncall_receiver_logs_and_keeps_notifications(capsys: pytest.CaptureFixture[str]) -> None:
    from http.server import ThreadingHTTPServer

    receiver = _load_receiver()
    server = ThreadingHTTPServer(("127.0.0.1", 0), receiver.make_handler(receiver.Inbox()))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_port}"
    notification: dict[str, Any] = {
        "receiver": "oncall-webhook", "status": "firing",
        "alerts": [{"status": "firing",
                    "labels": {"alertname": "HAMasterDown", "master": "master-a",
                               "severity": "critical"},
                    "annotations": {"summary": "Master master-a is down."}}],
    }
    try:
        req = urllib.request.Request(f"{base}/alerts", data=json.dumps(notification).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert resp.status == 200
        with urllib.request.urlopen(f"{base}/received", timeout=5) as resp:
            (entry,) = json.load(resp)
    finally:
        server.shutdown()
        server.server_close()
    assert entry["path"] == "/alerts" and entry["notification"] == notification
    assert entry["alerts"][0]["alertname"] == "HAMasterDown"
    assert '"alertname": "HAMasterDown"' in capsys.readouterr().out


# --- cluster mode: docker-compose.cluster.yml ------------------------------------------------
#
# A compose file of its own (not a profile of docker-compose.yml: a profile only adds services,
# so the single exporter would run beside the replicas and fail over the same masters). Three
# replicas on one etcd, each on its own config file (only cluster.member and cluster.url differ)
# and its own state volume; Prometheus scrapes every replica.

CLUSTER_COMPOSE = yaml.safe_load((ROOT / "docker-compose.cluster.yml").read_text())
CLUSTER_SERVICES = CLUSTER_COMPOSE["services"]
REPLICAS = ("exporter-1", "exporter-2", "exporter-3")
CLUSTER_EXAMPLE = ROOT / "examples" / "ha-exporter-cluster.yml"
CLUSTER_PROMETHEUS = ROOT / "deploy" / "compose" / "prometheus-cluster.yml"
#: Services both stacks run, defined the same way in both files.
SHARED_SERVICES = ("master-a", "master-b", "master-c", "alertmanager", "oncall", "grafana")
ETCD_IMAGE = re.compile(r"(quay\.io/coreos/etcd|gcr\.io/etcd-development/etcd):v3\.4(\.\d+)?")


def _cluster_mounted(service: str, container_path: str) -> Path:
    return _mounted(service, container_path, CLUSTER_SERVICES)


def _cluster_ports(service: str) -> dict[int, int]:
    return _ports(service, CLUSTER_SERVICES)


def _replica_config(service: str) -> Path:
    command = CLUSTER_SERVICES[service]["command"]
    assert command[:1] == ["run"], service
    config_path = _flag(command, "--config")
    assert config_path is not None, service
    return _cluster_mounted(service, config_path)


def test_the_cluster_stack_has_etcd_three_replicas_and_the_shared_services() -> None:
    assert CLUSTER_COMPOSE["name"] != COMPOSE["name"], "its own project: volumes apart"
    assert set(CLUSTER_SERVICES) == {"etcd", *REPLICAS, *SHARED_SERVICES, "prometheus"}
    for name, service in CLUSTER_SERVICES.items():
        for dep in service.get("depends_on", []):
            assert dep in CLUSTER_SERVICES, f"{name} depends on unknown service {dep}"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in CLUSTER_COMPOSE["volumes"], f"{name}: undeclared volume {source}"
    for name in SHARED_SERVICES:
        assert CLUSTER_SERVICES[name] == SERVICES[name], f"{name} drifted between the stacks"
    published = [host for name in CLUSTER_SERVICES for host in _cluster_ports(name).values()]
    assert len(published) == len(set(published))


def test_etcd_listens_on_2379_inside_the_compose_network() -> None:
    etcd = CLUSTER_SERVICES["etcd"]
    assert ETCD_IMAGE.fullmatch(etcd["image"]), etcd["image"]
    command = etcd["command"]
    assert command[0].endswith("etcd")
    assert _flag(command, "--listen-client-urls") == "http://0.0.0.0:2379"
    assert _flag(command, "--advertise-client-urls") == "http://etcd:2379"
    data_dir = _flag(command, "--data-dir")
    assert any(v.split(":")[1] == data_dir and not v.startswith((".", "/"))
               for v in etcd["volumes"]), "etcd's data on a named volume"
    assert "ports" not in etcd, "etcd is for the replicas only: not published on the host"


def test_each_replica_runs_its_own_config_that_the_loader_accepts() -> None:
    """Every mounted config passes exporter.config.load_config; each names its own service as
    member and url, reaches etcd by its service name, and listens where it publishes."""
    etcd_url = urlsplit(_flag(CLUSTER_SERVICES["etcd"]["command"], "--advertise-client-urls"))
    states = set()
    for name in REPLICAS:
        service = CLUSTER_SERVICES[name]
        path = _replica_config(name)
        assert path == (ROOT / "deploy/compose/cluster" / f"{name}.yml").resolve()
        cfg = load_config(path)
        assert cfg.cluster is not None, name
        assert cfg.cluster.member == name
        assert cfg.cluster.url is not None
        url = urlsplit(str(cfg.cluster.url))
        assert (url.hostname, url.port) == (name, cfg.listen.port), "others reach it by name"
        assert cfg.listen.host == "0.0.0.0"
        assert cfg.listen.port in _cluster_ports(name)
        for endpoint in cfg.cluster.etcd.endpoints:
            parts = urlsplit(endpoint)
            assert (parts.hostname, parts.port) == (etcd_url.hostname, etcd_url.port)
        assert {"etcd", "master-a", "master-b", "master-c"} <= set(service["depends_on"])
        assert "HA_EXPORTER_TOKEN" in service["environment"]
        assert service["environment"]["HA_EXPORTER_TOKEN"].startswith("${HA_EXPORTER_TOKEN:?")
        state = next(v.split(":")[0] for v in service["volumes"]
                     if v.split(":")[1] == str(Path(cfg.state_path).parent))
        states.add(state)
    assert len(states) == len(REPLICAS), "each replica keeps its own state file"
    tokens = {CLUSTER_SERVICES[n]["environment"]["HA_EXPORTER_TOKEN"] for n in REPLICAS}
    assert len(tokens) == 1, "one token: actions are redirected to the leader with it"
    images = {(CLUSTER_SERVICES[n].get("build"), CLUSTER_SERVICES[n]["image"]) for n in REPLICAS}
    assert images == {(SERVICES["exporter"]["build"], SERVICES["exporter"]["image"])}
    assert {tuple(CLUSTER_SERVICES[n]["command"]) for n in REPLICAS} == {
        tuple(SERVICES["exporter"]["command"])}


def test_replica_configs_are_the_compose_config_plus_one_cluster_section() -> None:
    """Everything but cluster: equals deploy/compose/config.yml (so the checked-in rules fit),
    and the cluster sections differ only in member and url."""
    single = yaml.safe_load(COMPOSE_CONFIG.read_text())
    sections = []
    for name in REPLICAS:
        replica = yaml.safe_load(_replica_config(name).read_text())
        sections.append({k: v for k, v in replica.pop("cluster").items()
                         if k not in ("member", "url")})
        assert replica == single, f"{name}: only the cluster: section may be added"
        assert render_texts(load_config(_replica_config(name))) == render_texts(
            load_config(EXAMPLE))
    assert all(s == sections[0] for s in sections)
    example = yaml.safe_load(CLUSTER_EXAMPLE.read_text())
    example_cluster = example.pop("cluster")
    assert example == yaml.safe_load(EXAMPLE.read_text()), (
        "examples/ha-exporter-cluster.yml is examples/ha-exporter.yml plus cluster:")
    assert load_config(CLUSTER_EXAMPLE).cluster is not None
    assert {k: v for k, v in example_cluster.items()
            if k not in ("member", "url", "etcd")} == {
        k: v for k, v in sections[0].items() if k != "etcd"}


def test_cluster_prometheus_scrapes_every_replica() -> None:
    command = CLUSTER_SERVICES["prometheus"]["command"]
    config_path = _flag(command, "--config.file")
    assert config_path is not None
    prom_file = _cluster_mounted("prometheus", config_path)
    assert prom_file == CLUSTER_PROMETHEUS.resolve()
    prom = yaml.safe_load(prom_file.read_text())
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    targets = [t for sc in jobs["ha-exporter"]["static_configs"] for t in sc["targets"]]
    expected = sorted(f"{n}:{load_config(_replica_config(n)).listen.port}" for n in REPLICAS)
    assert sorted(targets) == expected, "every replica a target of its own"
    assert set(CLUSTER_SERVICES["prometheus"]["depends_on"]) >= set(REPLICAS)
    # the rest is deploy/compose/prometheus.yml: rules, Alertmanager, the other jobs
    single = yaml.safe_load((ROOT / "deploy/compose/prometheus.yml").read_text())
    (single_job,) = [j for j in single["scrape_configs"] if j["job_name"] == "ha-exporter"]
    single_job["static_configs"] = jobs["ha-exporter"]["static_configs"]
    assert prom == single
    assert CLUSTER_SERVICES["prometheus"]["volumes"][1:] == SERVICES["prometheus"]["volumes"][1:]
    rules_dir = _cluster_mounted("prometheus", "/alert_rules")
    assert rules_dir == (ROOT / "alert_rules").resolve()


@pytest.mark.parametrize("path", ["deploy/compose/prometheus.yml",
                                  "deploy/compose/prometheus-cluster.yml"])
def test_promtool_accepts_the_compose_prometheus_configs(path: str) -> None:
    promtool = require_binary("promtool")
    checked = subprocess.run([promtool, "check", "config", str(ROOT / path)],
                             capture_output=True, text=True, timeout=60, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "2 rule files found" in checked.stdout
