"""The deployment files cannot rot silently: every Kubernetes manifest is valid for a pinned Kubernetes version, and
every flag, port, service address, secret file and environment variable they (and compose.yaml) use exists."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
COMPOSE = ROOT / "deploy" / "compose.yaml"
KUBERNETES_VERSION = "1.32.0"  # what the manifests are validated against (kubernetes-validate's bundled schemas)
SECRETS_DIR = "/run/aios/secrets/"
ADDRESS_FLAGS = ("--llm-core", "--memory", "--storage", "--tools", "--kernel")  # host:port of another service


def manifests() -> list[dict[str, Any]]:
    return [doc for path in sorted(K8S.glob("*.yaml")) if path.name != "kustomization.yaml"
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def containers(kind: str = "") -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, container) for every main container of every workload."""
    for doc in manifests():
        if doc["kind"] in ("Deployment", "StatefulSet") and (not kind or doc["kind"] == kind):
            for container in doc["spec"]["template"]["spec"]["containers"]:
                yield doc, container


def service_argv(argv: list[str]) -> tuple[str, list[str]] | None:
    """('memory', [args...]) for `python -m services.memory args...`, else None."""
    if len(argv) >= 3 and argv[0] == "python" and argv[1] == "-m" and argv[2].startswith("services."):
        return argv[2].split(".", 1)[1], argv[3:]
    return None


def container_argv(container: dict[str, Any]) -> tuple[str, list[str]] | None:
    return service_argv([*container.get("command", []), *container.get("args", [])])


def k8s_commands() -> list[tuple[str, str, list[str]]]:
    """(workload name, service module, args) of every AIOS container."""
    found = []
    for doc, container in containers():
        parsed = container_argv(container)
        if parsed:
            found.append((doc["metadata"]["name"], *parsed))
    return found


def compose_commands() -> list[tuple[str, str, list[str]]]:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    return [(name, *parsed) for name, spec in services.items()
            if (parsed := service_argv(spec.get("command", [])))]


_help: dict[str, set[str]] = {}


def flags_of(module: str) -> set[str]:
    """The options `python -m services.<module> --help` lists: what its parser really accepts."""
    if module not in _help:
        shown = subprocess.run([sys.executable, "-m", f"services.{module}", "--help"], cwd=ROOT, capture_output=True,
                               text=True, timeout=120, check=True).stdout
        _help[module] = set(re.findall(r"(--[a-z][a-z0-9-]*)", shown))
    return _help[module]


def flag_value(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def flag_values(args: list[str], flag: str) -> list[str]:
    """Every value of a repeatable flag."""
    return [args[i + 1] for i, arg in enumerate(args) if arg == flag]


def test_every_manifest_is_valid_kubernetes():
    docs = manifests()
    assert {d["kind"] for d in docs} >= {"Namespace", "Secret", "StatefulSet", "Deployment", "Service",
                                          "PodDisruptionBudget"}
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_kustomization_lists_every_manifest():
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def test_every_service_runs_and_every_flag_exists():
    for where, commands in (("k8s", k8s_commands()), ("compose", compose_commands())):
        modules = {module for _, module, _ in commands}
        assert modules == {"scheduler", "llm_core", "memory", "storage", "tools", "gateway"}, where
        for name, module, args in commands:
            unknown = {a for a in args if a.startswith("--")} - flags_of(module)
            assert not unknown, f"{where} {name}: services.{module} has no {sorted(unknown)}"


def test_ports_probes_and_service_addresses_match():
    services = {d["metadata"]["name"]: d for d in manifests() if d["kind"] == "Service"}
    listening: dict[str, int] = {}  # Service name -> the port its pods' process binds
    for doc, container in containers():
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        labels = doc["spec"]["template"]["metadata"]["labels"]
        parsed = container_argv(container)
        if parsed:
            bound = int(flag_value(parsed[1], "--port"))
            assert bound in ports.values(), f"{doc['metadata']['name']} binds {bound}, declares {ports}"
        for probe in ("readinessProbe", "livenessProbe"):
            check = container[probe]
            port = next(iter(check.values()))["port"] if "grpc" not in check else check["grpc"]["port"]
            assert port in ports or port in ports.values(), f"{doc['metadata']['name']} {probe} on {port}"
        for service in services.values():
            if all(labels.get(k) == v for k, v in service["spec"]["selector"].items()):
                for port in service["spec"]["ports"]:
                    assert port["targetPort"] in ports, f"{service['metadata']['name']} targets {port['targetPort']}"
                    listening[service["metadata"]["name"]] = ports[port["targetPort"]]
    sets = {d["metadata"]["name"]: d["spec"] for d in manifests() if d["kind"] == "StatefulSet"}
    for name, module, args in k8s_commands():
        for flag in ADDRESS_FLAGS:
            for value in flag_values(args, flag):
                host, port = value.rpartition("=")[2].split(":")
                pod, _, service = host.rpartition(".")
                if pod:  # one pod of a StatefulSet by its stable name: <set>-<ordinal>.<its headless Service>
                    workload, _, ordinal = pod.rpartition("-")
                    assert sets[workload]["serviceName"] == service and int(ordinal) < sets[workload]["replicas"], \
                        f"{name} {flag} {value}: no such pod of a StatefulSet governed by {service}"
                    assert services[service]["spec"].get("clusterIP") == "None", f"{service} is not headless"
                assert service in services, f"{name} {flag} names no Service {service}"
                served = {p["port"] for p in services[service]["spec"]["ports"]}
                assert int(port) in served and listening[service] == int(port), f"{name} {flag} {value}"
    kernel = next(args for _, module, args in k8s_commands() if module == "scheduler")
    tools = next(args for _, module, args in k8s_commands() if module == "tools")
    for flag, workload in (("--llm-core", "aios-llm-core"), ("--memory", "aios-memory"), ("--storage", "aios-storage")):
        assert len(flag_values(kernel, flag)) == sets[workload]["replicas"], f"one {flag} per pod of {workload}"
    # The storage shards' names decide which shard holds an agent: the tool manager must name them as the kernel does.
    assert flag_values(tools, "--storage") == flag_values(kernel, "--storage")
    compose = yaml.safe_load(COMPOSE.read_text())["services"]
    bound = {name: int(flag_value(args, "--port")) for name, _, args in compose_commands()}
    for name, _, args in compose_commands():
        for flag in ADDRESS_FLAGS:
            if flag in args:
                host, port = flag_value(args, flag).split(":")
                assert host in compose and bound.get(host) == int(port), f"compose {name} {flag} {host}:{port}"


def test_every_service_serves_metrics_on_the_port_its_pod_declares_and_asks_prometheus_to_scrape():
    for doc, container in containers():
        parsed = container_argv(container)
        if parsed is None:
            continue  # Redis
        port = int(flag_value(parsed[1], "--metrics-port"))
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        annotations = doc["spec"]["template"]["metadata"].get("annotations", {})
        name = doc["metadata"]["name"]
        assert ports.get("metrics") == port, f"{name}: --metrics-port {port}, ports {ports}"
        assert annotations.get("prometheus.io/scrape") == "true", name
        assert annotations.get("prometheus.io/port") == str(port), name


def test_every_secret_file_a_service_reads_is_a_key_of_the_secret_copied_into_its_pod():
    [secret] = [d for d in manifests() if d["kind"] == "Secret"]
    keys = set(secret["stringData"])
    for doc, container in containers():
        parsed = container_argv(container)
        files = [a for a in (parsed[1] if parsed else []) if a.startswith(SECRETS_DIR)]
        copied = {Path(arg).name for init in doc["spec"]["template"]["spec"].get("initContainers", [])
                  for arg in init["command"] if arg.startswith("/etc/aios/secret-source/")}
        for path in files:
            assert Path(path).name in keys and Path(path).name in copied, f"{doc['metadata']['name']} reads {path}"
    redis = next(c for d, c in containers("StatefulSet") if d["metadata"]["name"] == "aios-redis")
    assert all(e["valueFrom"]["secretKeyRef"]["key"] in keys for e in redis["env"])


def test_every_environment_variable_set_for_aios_is_read_by_the_code():
    names = {e["name"] for _, c in containers() for e in c.get("env", []) if e["name"].startswith("AIOS_")}
    compose = yaml.safe_load(COMPOSE.read_text())["services"]
    names |= {k for spec in compose.values() for k in (spec.get("environment") or {}) if k.startswith("AIOS_")}
    names |= set(re.findall(r"ENV (AIOS_[A-Z_]+)", (ROOT / "deploy" / "Dockerfile").read_text()))
    code = "\n".join(p.read_text() for p in (ROOT / "services").rglob("*.py"))
    assert names and all(f'"{name}"' in code for name in names), names


@pytest.mark.parametrize("flag", ["--registration-burst", "--data-dir"])
def test_the_flag_check_would_catch_a_flag_that_does_not_exist(flag):
    """The check above reads each service's real parser: the flag is in it, a typo'd one is not."""
    assert flag in flags_of("scheduler") | flags_of("memory") and flag + "x" not in flags_of("scheduler") | flags_of("memory")
