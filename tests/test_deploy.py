"""The shipping files agree with the code: setting names, ports, probes, topology, metric names, alert rules.

No Docker engine runs here, so the Dockerfile, compose file and manifests are parsed and checked against
``bridge.settings``, ``bridge.metrics`` and ``bridge.topology``; ``promtool`` checks and unit-tests the alert rules
(it fails under ``CI=true`` when promtool is missing, and skips elsewhere).
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import hashlib
import http.server
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

from bridge.leadership import Leadership, lock_name
from bridge.metrics import Metrics
from bridge.settings import SECRET_FIELDS, SETTING_NAMES, default_of, env_name, load_settings
from bridge.topology import describe

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
METRICS_PORT: int = default_of("metrics_port")
SHUTDOWN_TIMEOUT_S: float = default_of("shutdown_timeout_s")


# --- helpers ---


def _env_names() -> dict[str, str]:
    """Every environment variable the settings read, mapped to its field (``<VAR>_FILE`` for secrets too)."""
    names: dict[str, str] = {env_name(field): field for field in SETTING_NAMES}
    for field in SECRET_FIELDS:
        names[f"{env_name(field)}_FILE"] = field
    return names


ENV_NAMES = _env_names()


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No setting from the test's own environment or a stray ``.env`` leaks into ``load_settings``."""
    for var in list(os.environ):
        if var.startswith(("BRIDGE_", "ALIBABA_CLOUD_")):
            monkeypatch.delenv(var)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = _yaml(ROOT / "docker-compose.yml")
    assert isinstance(document, dict)
    return document


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]  # type: ignore[no-any-return]


def _command(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def _option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def _host_volumes(service: dict[str, Any]) -> dict[str, str]:
    """Bind mounts of a compose service: container path -> host path (relative to the repository root)."""
    mounts: dict[str, str] = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            source, target = volume["source"], volume["target"]
        else:
            source, target = volume.split(":")[:2]
        mounts[target] = source
    return mounts


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        message = "promtool is not installed (Debian: apt-get install prometheus)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


# --- docker-compose.yml ---


def test_compose_has_the_demo_services(services: dict[str, Any]) -> None:
    # `docker compose up` starts these; the `accounts` profile adds a bridge of two accounts and their simulators.
    default = {name for name, svc in services.items() if not svc.get("profiles")}
    assert default == {"rabbitmq", "simulator", "bridge", "prometheus", "grafana"}
    assert {name for name, svc in services.items() if "accounts" in svc.get("profiles", [])} == {
        "simulator-eu",
        "simulator-cn",
        "bridge-accounts",
    }
    assert set(services) == default | {"simulator-eu", "simulator-cn", "bridge-accounts"}
    # The simulator and the bridge run the same image, built from deploy/Dockerfile with the repo as context.
    for name in ("simulator", "bridge"):
        build = services[name]["build"]
        assert (ROOT / build["context"]).resolve() == ROOT
        assert (ROOT / build["context"] / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    assert services["simulator"]["image"] == services["bridge"]["image"]
    assert services["rabbitmq"]["image"].startswith(("rabbitmq:3.13-management", "rabbitmq:3.12-management"))
    assert services["prometheus"]["image"].startswith("prom/prometheus")
    assert services["grafana"]["image"].startswith("grafana/grafana")


def test_every_bind_mounted_file_exists(services: dict[str, Any]) -> None:
    mounts = [(name, source) for name, svc in services.items() for source in _host_volumes(svc).values()]
    assert mounts
    for name, source in mounts:
        assert source.startswith("./"), f"{name}: {source} is not a bind mount of a repository path"
        assert (ROOT / source).exists(), f"{name}: {source} does not exist"


def test_rabbitmq_loads_the_definitions_and_has_a_health_check(services: dict[str, Any]) -> None:
    rabbitmq = services["rabbitmq"]
    assert rabbitmq["healthcheck"]["test"] == ["CMD", "rabbitmq-diagnostics", "-q", "ping"]
    # Published beside the quickstart's local broker (5672/15672), never over it; tests/test_compose_path.py
    # runs the documented host commands against these ports.
    assert {"5673:5672", "15673:15672"} <= {str(p) for p in rabbitmq["ports"]}
    mounts = _host_volumes(rabbitmq)
    conf_targets = [t for t, s in mounts.items() if s.endswith("deploy/rabbitmq/rabbitmq.conf")]
    assert len(conf_targets) == 1
    # The official image reads /etc/rabbitmq/rabbitmq.conf and then every conf.d/*.conf.
    assert re.fullmatch(r"/etc/rabbitmq/(rabbitmq\.conf|conf\.d/[\w.-]+\.conf)", conf_targets[0])
    conf = (DEPLOY / "rabbitmq" / "rabbitmq.conf").read_text(encoding="utf-8")
    loaded = re.findall(r"^\s*(?:management\.)?load_definitions\s*=\s*(\S+)\s*$", conf, re.MULTILINE)
    assert len(loaded) == 1
    assert mounts[loaded[0]] == "./deploy/rabbitmq/definitions.json"


def test_bridge_waits_for_a_healthy_broker_and_the_simulator(services: dict[str, Any]) -> None:
    depends_on = services["bridge"]["depends_on"]
    assert depends_on["rabbitmq"]["condition"] == "service_healthy"
    assert depends_on["simulator"]["condition"] in {"service_started", "service_healthy"}


def test_bridge_environment_names_real_settings(services: dict[str, Any]) -> None:
    env = _environment(services["bridge"])
    unknown = sorted(set(env) - set(ENV_NAMES))
    assert not unknown, f"not settings of bridge/settings.py: {unknown}"


def test_bridge_environment_is_valid_and_matches_the_simulator(
    services: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _isolated_env(monkeypatch, tmp_path)
    for key, value in _environment(services["bridge"]).items():
        monkeypatch.setenv(key, value)
    settings = load_settings(credentials=True)

    simulator = _command(services["simulator"])
    assert simulator[0] == "simulate"
    assert _option(simulator, "--host") == "0.0.0.0"
    assert settings.account.base_url == f"http://simulator:{_option(simulator, '--port')}"
    assert settings.account.access_key_id is not None and settings.account.access_key_secret is not None
    # The simulator's keys default to these; the compose file may spell them out, but they must agree.
    sim_id = _option(simulator, "--access-key-id") if "--access-key-id" in simulator else "sim-access-key-id"
    sim_secret = (
        _option(simulator, "--access-key-secret") if "--access-key-secret" in simulator else "sim-access-key-secret"
    )
    assert settings.account.access_key_id.get_secret_value() == sim_id
    assert settings.account.access_key_secret.get_secret_value() == sim_secret

    # The AMQP user is one the definitions create, with the password the URL carries.
    url = settings.broker.amqp_url.get_secret_value()
    match = re.fullmatch(r"amqp://([^:@/]+):([^@/]+)@rabbitmq:5672/", url)
    assert match, settings.broker.amqp_url_masked
    user, password = match.groups()
    definitions = json.loads((DEPLOY / "rabbitmq" / "definitions.json").read_text(encoding="utf-8"))
    entry = next(u for u in definitions["users"] if u["name"] == user)
    assert _rabbit_password_matches(entry, password)
    assert settings.broker.exchange == "domain.tasks"


def test_bridge_replicas_ports_and_stop_grace_period(services: dict[str, Any]) -> None:
    bridge = services["bridge"]
    port = int(_environment(bridge).get("BRIDGE_METRICS_PORT", METRICS_PORT))
    assert port == METRICS_PORT
    # Two replicas of one service: one leads, one stands by. Each takes a host port of the range (one fixed host
    # port would clash), and nothing pins a container name (which would also stop the second replica).
    replicas = bridge["deploy"]["replicas"]
    assert replicas == 2
    assert "container_name" not in bridge
    assert f"{port}-{port + replicas - 1}:{port}" in {str(p) for p in bridge["ports"]}
    assert _environment(bridge).get("BRIDGE_LEADER_ELECTION", "true") == "true"
    grace = re.fullmatch(r"(\d+)s", bridge["stop_grace_period"])
    assert grace and int(grace.group(1)) > SHUTDOWN_TIMEOUT_S


def test_compose_accounts_profile_polls_two_simulators(services: dict[str, Any]) -> None:
    bridge = services["bridge-accounts"]
    env = _environment(bridge)
    unknown = sorted(set(env) - set(ENV_NAMES) - {"BRIDGE_CONFIG_FILE"})
    assert not unknown, f"not settings of bridge/settings.py: {unknown}"
    # Refused at start beside a file with [[accounts]].
    assert not [name for name in env if name.startswith("ALIBABA_CLOUD_") or name == "BRIDGE_ACCOUNT"]
    assert env["BRIDGE_AMQP_URL"] == _environment(services["bridge"])["BRIDGE_AMQP_URL"]
    source = _host_volumes(bridge)[env["BRIDGE_CONFIG_FILE"]]
    accounts = _check_accounts_file(tomllib.loads((ROOT / source).read_text(encoding="utf-8")))
    assert len(accounts) == 2
    # Each account is played by its own simulator of the profile, which knows that account's keys.
    simulators = {}
    for name in ("simulator-eu", "simulator-cn"):
        argv = _command(services[name])
        assert argv[0] == "simulate" and _option(argv, "--host") == "0.0.0.0"
        url = f"http://{name}:{_option(argv, '--port')}"
        simulators[url] = (_option(argv, "--access-key-id"), _option(argv, "--access-key-secret"))
        assert bridge["depends_on"][name]["condition"] in {"service_started", "service_healthy"}
    assert bridge["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
    assert sorted(account["endpoint"] for account in accounts) == sorted(simulators)
    for account in accounts:
        assert simulators[account["endpoint"]] == (account["access_key_id"], account["access_key_secret"])
    # Prometheus discovers the bridges by the DNS name `bridge`: this one answers to it as well.
    assert "bridge" in bridge["networks"]["default"]["aliases"]
    grace = re.fullmatch(r"(\d+)s", bridge["stop_grace_period"])
    assert grace and int(grace.group(1)) > SHUTDOWN_TIMEOUT_S


def test_simulator_health_check_works(services: dict[str, Any], unused_port: int) -> None:
    check = services["simulator"]["healthcheck"]["test"]
    assert check[0] == "CMD"
    port = int(_option(_command(services["simulator"]), "--port"))
    argv = [sys.executable if part == "python" else part for part in check[1:]]
    assert str(port) in argv[-1]
    argv[-1] = argv[-1].replace(str(port), str(unused_port))
    assert _run(argv, ROOT).returncode != 0  # nothing listens
    with _http_server(unused_port, {"/": 200}):
        assert _run(argv, ROOT).returncode == 0


def test_prometheus_and_grafana_are_wired(services: dict[str, Any]) -> None:
    prometheus_mounts = _host_volumes(services["prometheus"])
    config_target = next(t for t, s in prometheus_mounts.items() if s.endswith("prometheus/prometheus.yml"))
    config = _yaml(DEPLOY / "prometheus" / "prometheus.yml")
    for rules in config["rule_files"]:
        target = str(Path(config_target).parent / rules)
        assert prometheus_mounts[target] == f"./deploy/prometheus/{rules}"
    scrape = next(job for job in config["scrape_configs"] if "bridge" in json.dumps(job))
    assert scrape.get("metrics_path", "/metrics") == "/metrics"
    # Every replica: the compose service's name resolves to one address per container.
    assert scrape["dns_sd_configs"] == [{"names": ["bridge"], "type": "A", "port": METRICS_PORT}]

    grafana_mounts = _host_volumes(services["grafana"])
    provider = _yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "task-bridge.yml")["providers"][0]
    assert grafana_mounts[provider["options"]["path"]] == "./deploy/grafana/dashboards"
    for kind in ("datasources", "dashboards"):
        provisioned = [t for t, s in grafana_mounts.items() if s.endswith(f"provisioning/{kind}")]
        assert provisioned == [f"/etc/grafana/provisioning/{kind}"]
    datasource = _yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090"
    assert "9090:9090" in services["prometheus"]["ports"]
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "task-bridge.json").read_text(encoding="utf-8"))
    variable = next(v for v in dashboard["templating"]["list"] if v["type"] == "datasource")
    assert variable["current"]["value"] == datasource["uid"]


# --- deploy/Dockerfile and .dockerignore ---


def _dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile as stages of (INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    stages: list[list[tuple[str, str]]] = [[]]
    for line in joined.splitlines():
        if not line.strip():
            continue
        keyword, _, rest = line.strip().partition(" ")
        if keyword.upper() == "FROM":
            stages.append([])
        stages[-1].append((keyword.upper(), rest.strip()))
    return stages


def _instructions(stage: list[tuple[str, str]], keyword: str) -> list[str]:
    return [rest for kw, rest in stage if kw == keyword]


def test_dockerfile_final_stage() -> None:
    stages = _dockerfile_stages()
    assert len(stages) >= 3, "a builder stage and a final stage"
    final = stages[-1]
    assert _instructions(final, "FROM")[0].split()[0] in {"${PYTHON_IMAGE}", "python:3.11-slim", "python:3.12-slim"}
    base = re.search(r"ARG PYTHON_IMAGE=(\S+)", (DEPLOY / "Dockerfile").read_text(encoding="utf-8"))
    assert base and re.fullmatch(r"python:3\.1[12]-slim(-\w+)?", base.group(1))

    user = _instructions(final, "USER")
    assert user, "the final stage must switch to a non-root user"
    uid = user[-1].split(":")[0]
    assert uid.isdigit() and int(uid) >= 1000, "a fixed numeric non-root UID (runAsNonRoot can verify it)"

    assert _instructions(final, "EXPOSE") == [str(METRICS_PORT)]
    assert json.loads(_instructions(final, "ENTRYPOINT")[0]) == ["task-bridge"]
    assert json.loads(_instructions(final, "CMD")[0]) == ["run"]
    env = " ".join(_instructions(final, "ENV"))
    assert "PYTHONDONTWRITEBYTECODE=1" in env and "PYTHONUNBUFFERED=1" in env

    final_text = " ".join(rest for _, rest in final)
    for tool in ("gcc", "build-essential", "apt-get install", "g++", "make "):
        assert tool not in final_text, f"{tool} in the final stage"
    # Only the built virtualenv comes from the builder.
    copies = _instructions(final, "COPY")
    assert copies and all(c.startswith("--from=builder") for c in copies)


def test_dockerfile_health_check_asks_healthz(unused_port: int) -> None:
    final = _dockerfile_stages()[-1]
    healthcheck = _instructions(final, "HEALTHCHECK")[0]
    command = json.loads(healthcheck[healthcheck.index("CMD") + 3 :])
    assert command[0] == "python" and "/healthz" in command[-1] and str(METRICS_PORT) in command[-1]
    argv = [sys.executable, *command[1:]]
    env = {**os.environ, "BRIDGE_METRICS_PORT": str(unused_port)}

    def run() -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(argv, env=env, capture_output=True, timeout=30, check=False)

    assert run().returncode != 0  # nothing listens
    with _http_server(unused_port, {"/healthz": 200}):
        assert run().returncode == 0
    with _http_server(unused_port, {"/healthz": 503}):
        assert run().returncode != 0


def test_console_script_is_the_entrypoint() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "task-bridge" in project["project"]["scripts"]


def _dockerignore() -> list[tuple[bool, str]]:
    patterns = []
    for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            patterns.append((line.startswith("!"), line.removeprefix("!").rstrip("/")))
    return patterns


def _ignored(path: str, patterns: list[tuple[bool, str]]) -> bool:
    """Docker's rule: the last pattern matching the path (or one of its parent directories) wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for negated, pattern in patterns:
        variants = {pattern, pattern.removeprefix("**/")}
        if any(fnmatch.fnmatchcase(c, v) for c in candidates for v in variants):
            ignored = not negated
    return ignored


def test_dockerignore_keeps_the_build_inputs_and_nothing_secret() -> None:
    patterns = _dockerignore()
    builder = _dockerfile_stages()[1]
    sources = [
        src for copy in _instructions(builder, "COPY") if not copy.startswith("--from") for src in copy.split()[:-1]
    ]
    assert "pyproject.toml" in sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not _ignored(source, patterns), f"{source} is copied but .dockerignore drops it"
    assert not _ignored("bridge/settings.py", patterns)
    for path in (
        ".env",
        "bridge/.env",
        ".git/config",
        ".venv/bin/python",
        "tests/test_deploy.py",
        "bridge/__pycache__/settings.cpython-311.pyc",
    ):
        assert _ignored(path, patterns), f"{path} would be sent to the Docker daemon"


# --- deploy/requirements.lock: the image's dependencies, pinned and hashed ---

LOCK = DEPLOY / "requirements.lock"


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _locked() -> dict[str, tuple[str, list[str]]]:
    """The lock file as {canonical name: (version, [sha256 hashes])}."""
    text = LOCK.read_text(encoding="utf-8")
    entries: dict[str, tuple[str, list[str]]] = {}
    for block in re.split(r"\n(?=[A-Za-z0-9])", re.sub(r"^#.*\n", "", text, flags=re.MULTILINE)):
        match = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", block)
        if match:
            hashes = re.findall(r"--hash=sha256:([0-9a-f]{64})", block)
            entries[_canonical(match.group(1))] = (match.group(2), hashes)
    return entries


def test_lock_pins_and_hashes_every_runtime_dependency() -> None:
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    locked = _locked()
    assert locked, "deploy/requirements.lock lists nothing"
    regenerate = "regenerate deploy/requirements.lock with the command in its header (deploy/README.md)"
    needed = [*project["project"]["dependencies"], *project["build-system"]["requires"]]
    for spec in needed:
        requirement = Requirement(spec)
        name = _canonical(requirement.name)
        assert name in locked, f"{requirement.name} (pyproject.toml) is not in the lock: {regenerate}"
        version, _ = locked[name]
        satisfied = requirement.specifier.contains(version, prereleases=True)
        assert satisfied, f"{name}=={version} is not {spec}: {regenerate}"
    for name, (_, hashes) in locked.items():
        assert hashes, f"{name} has no hash: pip --require-hashes would refuse the lock"


def test_lock_is_closed_over_the_dependencies_of_what_it_pins() -> None:
    # Every requirement of every locked distribution (as installed here, when it is the locked version) is locked
    # too, or `pip install --require-hashes` fails in the image build.
    import importlib.metadata

    from packaging.requirements import Requirement

    locked = _locked()
    environment = {"python_version": "3.11", "sys_platform": "linux", "platform_system": "Linux", "extra": ""}
    checked = 0
    for name, (version, _) in locked.items():
        try:
            distribution = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        if distribution.version != version:
            continue
        checked += 1
        for spec in distribution.requires or []:
            requirement = Requirement(spec)
            if requirement.marker is None or requirement.marker.evaluate(environment):
                assert _canonical(requirement.name) in locked, f"{name} needs {spec}, which the lock misses"
    if checked == 0:  # the environment moved on from the lock's versions; the image build's `pip check` remains
        pytest.skip("no locked version is installed here")


def test_dockerfile_installs_from_the_lock() -> None:
    builder = _dockerfile_stages()[1]
    runs = _instructions(builder, "RUN")
    lock_install = next(r for r in runs if "requirements.lock" in r)
    assert "--require-hashes" in lock_install and "--no-deps" in lock_install
    project_install = next(r for r in runs if re.search(r"pip install [^&]*\.(\s|$)", r))
    assert "--no-deps" in project_install and "--no-build-isolation" in project_install
    assert "pip check" in project_install
    assert runs.index(lock_install) < runs.index(project_install)
    assert not any("--upgrade pip" in r for r in runs), "an unpinned pip would make the build depend on the day"
    copies = " ".join(_instructions(builder, "COPY"))
    assert "deploy/requirements.lock" in copies


def test_lock_regeneration_command_is_documented() -> None:
    header = re.search(r"^#\s+(.*uv pip compile.*)$", LOCK.read_text(encoding="utf-8"), flags=re.MULTILINE)
    assert header, "the lock's header names the command that made it"
    command = header.group(1).strip()
    assert "--generate-hashes" in command and "-o deploy/requirements.lock" in command
    assert command in (DEPLOY / "README.md").read_text(encoding="utf-8")


# --- deploy/kubernetes ---


def _k8s(name: str) -> dict[str, Any]:
    document = _yaml(K8S / name)
    assert isinstance(document, dict)
    return document


@pytest.fixture(scope="module")
def deployment() -> dict[str, Any]:
    return _k8s("deployment.yaml")


@pytest.fixture(scope="module")
def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]  # type: ignore[no-any-return]


def test_kustomization_lists_existing_manifests() -> None:
    kustomization = _k8s("kustomization.yaml")
    resources = kustomization["resources"]
    for resource in resources:
        assert (K8S / resource).is_file(), resource
    assert {"deployment.yaml", "service.yaml", "servicemonitor.yaml", "prometheusrule.yaml"} <= set(resources)
    # The example Secret holds placeholders: it is not applied with the rest.
    assert "secret.example.yaml" not in resources
    for manifest in K8S.glob("*.yaml"):
        assert "namespace" not in _yaml(manifest).get("metadata", {}), f"{manifest.name} pins a namespace"
    image = _k8s("deployment.yaml")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert kustomization["images"][0]["name"] == image


def test_replicas_roll_one_at_a_time_spread_over_nodes_and_time_to_drain(deployment: dict[str, Any]) -> None:
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    # The new pod starts (and stands by) before an old one stops: the account always has a poller or a standby.
    assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    anti = spec["template"]["spec"]["affinity"]["podAntiAffinity"]
    assert "requiredDuringSchedulingIgnoredDuringExecution" not in anti  # a one-node cluster still runs both
    [preferred] = anti["preferredDuringSchedulingIgnoredDuringExecution"]
    term = preferred["podAffinityTerm"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"] == spec["selector"]["matchLabels"]
    configmap = _k8s("configmap.yaml")["data"]
    shutdown_s = float(configmap.get("BRIDGE_SHUTDOWN_TIMEOUT_SECONDS", SHUTDOWN_TIMEOUT_S))
    assert spec["template"]["spec"]["terminationGracePeriodSeconds"] > shutdown_s


def test_pod_disruption_budget_keeps_one_replica(deployment: dict[str, Any]) -> None:
    assert "pdb.yaml" in _k8s("kustomization.yaml")["resources"]
    budget = _k8s("pdb.yaml")
    assert (budget["apiVersion"], budget["kind"]) == ("policy/v1", "PodDisruptionBudget")
    assert budget["spec"]["minAvailable"] == 1
    assert budget["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]


def test_probes_and_ports(container: dict[str, Any]) -> None:
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": METRICS_PORT}
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path
        assert get["port"] in ("metrics", METRICS_PORT)


def test_security_context_and_resources(deployment: dict[str, Any], container: dict[str, Any]) -> None:
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    user = _instructions(_dockerfile_stages()[-1], "USER")[-1]
    assert str(pod["securityContext"]["runAsUser"]) == user.split(":")[0]
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind])


def test_environment_names_real_settings(container: dict[str, Any]) -> None:
    configmap = _k8s("configmap.yaml")
    assert container["envFrom"] == [{"configMapRef": {"name": configmap["metadata"]["name"]}}]
    names = {e["name"] for e in container["env"]} | set(configmap["data"])
    unknown = sorted(names - set(ENV_NAMES))
    assert not unknown, f"not settings of bridge/settings.py: {unknown}"
    assert all(isinstance(v, str) for v in configmap["data"].values()), "ConfigMap values must be strings"
    assert int(configmap["data"].get("BRIDGE_METRICS_PORT", METRICS_PORT)) == METRICS_PORT
    # Secrets come from files only, never from plain variables.
    secret_vars = {env_name(field) for field in SECRET_FIELDS}
    assert not names & secret_vars


def test_secret_files_are_mounted_where_the_file_variables_point(
    deployment: dict[str, Any], container: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pod = deployment["spec"]["template"]["spec"]
    secret = _k8s("secret.example.yaml")
    volume = next(v for v in pod["volumes"] if "secret" in v)
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    assert volume["secret"]["defaultMode"] & 0o007 == 0, "secret files must not be world-readable"
    items = {item["key"]: item["path"] for item in volume["secret"]["items"]}
    assert set(items) == set(secret["stringData"])
    mount = next(m for m in container["volumeMounts"] if m["name"] == volume["name"])
    assert mount["readOnly"] is True

    file_vars = {e["name"]: e["value"] for e in container["env"] if e["name"].endswith("_FILE")}
    expected = {f"{env_name(f)}_FILE" for f in ("access_key_id", "access_key_secret", "amqp_url")}
    assert set(file_vars) >= expected
    mounted = {f"{mount['mountPath']}/{path}": key for key, path in items.items()}
    for var, path in file_vars.items():
        assert path in mounted, f"{var} points at {path}, which the Secret volume does not provide"

    # The settings read those files: give them the example Secret's values through the same variables.
    _isolated_env(monkeypatch, tmp_path)
    for key, value in _k8s("configmap.yaml")["data"].items():
        monkeypatch.setenv(key, value)
    for var, path in file_vars.items():
        local = tmp_path / mounted[path]
        local.write_text(secret["stringData"][mounted[path]] + "\n", encoding="utf-8")
        monkeypatch.setenv(var, str(local))
    settings = load_settings(credentials=True)
    assert settings.account.access_key_secret is not None
    assert settings.account.access_key_secret.get_secret_value() == secret["stringData"]["access-key-secret"]
    assert settings.broker.amqp_url.get_secret_value() == secret["stringData"]["amqp-url"]


def test_service_and_servicemonitor_select_the_bridge(deployment: dict[str, Any], container: dict[str, Any]) -> None:
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    service = _k8s("service.yaml")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    port = service["spec"]["ports"][0]
    assert port["targetPort"] in ("metrics", METRICS_PORT) and port["port"] == METRICS_PORT

    monitor = _k8s("servicemonitor.yaml")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["kind"] == "ServiceMonitor"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    endpoint = monitor["spec"]["endpoints"][0]
    assert endpoint["port"] == port["name"] and endpoint["path"] == "/metrics"


def test_operator_resources_carry_the_label_kube_prometheus_stack_selects_on() -> None:
    # kube-prometheus-stack's Prometheus selects ServiceMonitors and PrometheusRules by `release: <release name>`.
    for name in ("servicemonitor.yaml", "prometheusrule.yaml"):
        assert _k8s(name)["metadata"]["labels"]["release"] == "kube-prometheus-stack", name
        assert "release: kube-prometheus-stack" in (K8S / name).read_text(encoding="utf-8").split("apiVersion")[0]


def test_prometheusrule_is_alerts_yml() -> None:
    rule = _k8s("prometheusrule.yaml")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["kind"] == "PrometheusRule"
    assert rule["spec"]["groups"] == _yaml(DEPLOY / "prometheus" / "alerts.yml")["groups"]
    # Byte for byte what the generator prints, so a regenerated file never shows a spurious diff.
    generated = _run([sys.executable, str(DEPLOY / "prometheus" / "prometheusrule.py")], ROOT)
    assert generated.returncode == 0, generated.stderr
    assert generated.stdout == (K8S / "prometheusrule.yaml").read_text(encoding="utf-8"), (
        "regenerate: python deploy/prometheus/prometheusrule.py > deploy/kubernetes/prometheusrule.yaml"
    )


# --- several accounts: deploy/config/*.toml and deploy/kubernetes-accounts ---

CONFIG = DEPLOY / "config"
K8S_ACCOUNTS = DEPLOY / "kubernetes-accounts"
# The keys of an [[accounts]] table (docs/operating.md#several-accounts).
ACCOUNT_KEYS = {
    "name",
    *(
        f"{secret}{suffix}"
        for secret in ("access_key_id", "access_key_secret", "security_token")
        for suffix in ("", "_file")
    ),
    "api",
    "endpoint",
    "signature_version",
    "lang",
    "task_result_status",
    "domain_name",
    "instance_id",
    "task_no",
    "user_client_ip",
}
ACCOUNT_NAME = re.compile(r"[a-z0-9-]{1,40}")


def _top_level_keys() -> set[str]:
    """Any BRIDGE_ setting of docs/operating.md's table (tests/test_readme.py ties it to the code), lower case,
    without the prefix; BRIDGE_ACCOUNT is refused beside [[accounts]]."""
    operating = (ROOT / "docs" / "operating.md").read_text(encoding="utf-8")
    table = operating.split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]
    variables = re.findall(r"^\| `BRIDGE_([A-Z0-9_]+)` \|", table, flags=re.MULTILINE)
    assert len(variables) > 20
    return {name.lower() for name in variables} - {"account"}


def _check_accounts_file(document: dict[str, Any]) -> list[dict[str, Any]]:
    """The checks of a configuration file with [[accounts]] that need no code: keys, names, credentials."""
    unknown = sorted(set(document) - _top_level_keys() - {"accounts"})
    assert not unknown, f"not documented top-level keys: {unknown}"
    accounts = document["accounts"]
    assert isinstance(accounts, list) and accounts, "[[accounts]] holds at least one table"
    names = []
    for account in accounts:
        unknown = sorted(set(account) - ACCOUNT_KEYS)
        assert not unknown, f"not documented keys of an account: {unknown}"
        name = account["name"]
        assert isinstance(name, str) and ACCOUNT_NAME.fullmatch(name), f"account name {name!r} is not [a-z0-9-]+"
        names.append(name)
        for secret in ("access_key_id", "access_key_secret"):
            given = [key for key in (secret, f"{secret}_file") if key in account]
            assert len(given) == 1, f"{name}: exactly one of {secret} and {secret}_file"
        assert not {"security_token", "security_token_file"} <= set(account), name
        assert all(isinstance(value, str) and value for value in account.values()), name
        assert account.get("api", "domain-intl") in {"domain-intl", "domain"}, name
        assert account.get("signature_version", "v3") in {"v3", "v1"}, name
        assert account.get("lang", "en") in {"en", "zh"}, name
        assert account.get("task_result_status", "2") in {"2", "3"}, name
    assert len(names) == len(set(names)), f"account names repeat: {names}"
    return accounts  # type: ignore[no-any-return]


@pytest.mark.parametrize("path", sorted(CONFIG.glob("*.toml")), ids=lambda p: p.name)
def test_accounts_files_use_documented_keys_and_valid_names(path: Path) -> None:
    accounts = _check_accounts_file(tomllib.loads(path.read_text(encoding="utf-8")))
    assert len(accounts) >= 2


def test_the_sample_gives_secrets_as_files_only() -> None:
    document = tomllib.loads((CONFIG / "accounts.example.toml").read_text(encoding="utf-8"))
    for account in document["accounts"]:
        assert {"access_key_id_file", "access_key_secret_file"} <= set(account), account["name"]
    secrets = {"access_key_id", "access_key_secret", "security_token", "amqp_url"}
    assert not secrets & {key for table in [document, *document["accounts"]] for key in table}


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        ({"accounts": [{"name": "eu", "access_key_id": "a", "access_key_secret": "b", "region": "x"}]}, "region"),
        ({"exchnage": "x", "accounts": [{"name": "eu", "access_key_id": "a", "access_key_secret": "b"}]}, "exchnage"),
        ({"account": "x", "accounts": [{"name": "eu", "access_key_id": "a", "access_key_secret": "b"}]}, "account"),
        ({"accounts": [{"name": "EU", "access_key_id": "a", "access_key_secret": "b"}]}, "[a-z0-9-]+"),
        ({"accounts": [{"name": "eu_1", "access_key_id": "a", "access_key_secret": "b"}]}, "[a-z0-9-]+"),
        ({"accounts": [{"name": "e" * 41, "access_key_id": "a", "access_key_secret": "b"}]}, "[a-z0-9-]+"),
        ({"accounts": [{"name": "eu", "access_key_id": "a", "access_key_secret": "b"}] * 2}, "repeat"),
        ({"accounts": [{"name": "eu", "access_key_id": "a"}]}, "access_key_secret"),
        (
            {
                "accounts": [
                    {"name": "eu", "access_key_id": "a", "access_key_secret": "b", "access_key_secret_file": "c"}
                ]
            },
            "access_key_secret",
        ),
        ({"accounts": []}, "at least one"),
    ],
)
def test_accounts_file_checks_refuse_what_they_should(document: dict[str, Any], problem: str) -> None:
    with pytest.raises(AssertionError, match=re.escape(problem)):
        _check_accounts_file(document)


def _overlay(name: str) -> dict[str, Any]:
    document = _yaml(K8S_ACCOUNTS / name)
    assert isinstance(document, dict)
    return document


def test_kubernetes_accounts_overlay_ships_the_sample() -> None:
    kustomization = _overlay("kustomization.yaml")
    assert kustomization["resources"] == ["../kubernetes", "configmap.yaml"]
    assert "secret.example.yaml" not in kustomization["resources"]
    configmap = _overlay("configmap.yaml")
    assert configmap["data"]["accounts.toml"] == (CONFIG / "accounts.example.toml").read_text(encoding="utf-8")
    # The settings the file sets at its top level, and BRIDGE_ACCOUNT, leave the base's environment: a variable
    # would override the file's key, and BRIDGE_ACCOUNT is refused beside [[accounts]].
    top_level = set(tomllib.loads(configmap["data"]["accounts.toml"])) - {"accounts"}
    base_data = _k8s("configmap.yaml")["data"]
    [patch] = [yaml.safe_load(p["patch"]) for p in kustomization["patches"] if "patch" in p]
    assert patch["kind"] == "ConfigMap" and patch["metadata"]["name"] == _k8s("configmap.yaml")["metadata"]["name"]
    removed = {key for key, value in patch["data"].items() if value is None}
    expected = {key for key in base_data if key == "BRIDGE_ACCOUNT" or key.removeprefix("BRIDGE_").lower() in top_level}
    assert removed == expected
    assert {"BRIDGE_ACCOUNT", "BRIDGE_EXCHANGE"} <= removed


def test_kubernetes_accounts_overlay_mounts_every_file_the_sample_names(container: dict[str, Any]) -> None:
    patch = _overlay("deployment-patch.yaml")
    pod = patch["spec"]["template"]["spec"]
    [patched] = pod["containers"]
    assert patched["name"] == container["name"]
    env = {e["name"]: e for e in patched["env"]}
    # No ALIBABA_CLOUD_* variable of the base survives (refused at start beside [[accounts]]).
    base_alibaba = {e["name"] for e in container["env"] if e["name"].startswith("ALIBABA_CLOUD_")}
    assert base_alibaba
    assert {name for name, e in env.items() if e.get("$patch") == "delete"} == base_alibaba

    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in patched["volumeMounts"]}
    config = volumes["accounts"]["configMap"]
    assert config["name"] == _overlay("configmap.yaml")["metadata"]["name"]
    [item] = config["items"]
    assert env["BRIDGE_CONFIG_FILE"]["value"] == f"{mounts['accounts']['mountPath']}/{item['path']}"
    assert item["key"] == "accounts.toml" and mounts["accounts"]["readOnly"] is True

    # The credentials volume replaces the base's: same name, so the base's mount (and BRIDGE_AMQP_URL_FILE) holds.
    base_mount = next(m for m in container["volumeMounts"] if m["name"] == "credentials")
    secret = _overlay("secret.example.yaml")
    source = volumes["credentials"]["secret"]
    assert source["secretName"] == secret["metadata"]["name"]
    assert source["defaultMode"] & 0o007 == 0, "secret files must not be world-readable"
    items = {i["key"]: i["path"] for i in source["items"]}
    assert set(items) == set(secret["stringData"])
    provided = {f"{base_mount['mountPath']}/{path}" for path in items.values()}
    base_files = {e["value"] for e in container["env"] if e["name"] == "BRIDGE_AMQP_URL_FILE"}
    assert base_files and base_files <= provided
    document = tomllib.loads((CONFIG / "accounts.example.toml").read_text(encoding="utf-8"))
    named = {value for account in document["accounts"] for key, value in account.items() if key.endswith("_file")}
    assert named and named <= provided, f"not mounted: {sorted(named - provided)}"


def test_kubernetes_accounts_overlay_renders() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (its built-in kustomize renders the overlay)")
    result = _run([kubectl, "kustomize", str(K8S_ACCOUNTS)], ROOT)
    assert result.returncode == 0, result.stderr
    documents = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(result.stdout)}
    deployment = documents[("Deployment", "task-bridge")]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    names = {e["name"] for e in container["env"]} | set(documents[("ConfigMap", "task-bridge")]["data"])
    assert "BRIDGE_CONFIG_FILE" in names
    assert not [n for n in names if n.startswith("ALIBABA_CLOUD_") or n == "BRIDGE_ACCOUNT"]
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["credentials"]["secret"]["secretName"] == "task-bridge-accounts"
    accounts_toml = documents[("ConfigMap", "task-bridge-accounts")]["data"]["accounts.toml"]
    assert accounts_toml == (CONFIG / "accounts.example.toml").read_text(encoding="utf-8")


# --- deploy/rabbitmq/definitions.json ---


@pytest.fixture(scope="module")
def definitions() -> dict[str, Any]:
    return json.loads((DEPLOY / "rabbitmq" / "definitions.json").read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def _rabbit_password_matches(user: dict[str, Any], password: str) -> bool:
    """RabbitMQ's ``rabbit_password_hashing_sha256``: base64(salt(4) + sha256(salt + password))."""
    assert user["hashing_algorithm"] == "rabbit_password_hashing_sha256"
    raw = base64.b64decode(user["password_hash"])
    salt, digest = raw[:4], raw[4:]
    return hashlib.sha256(salt + password.encode()).digest() == digest


def test_definitions_contain_the_topology_verbatim(definitions: dict[str, Any]) -> None:
    topology = describe("domain.tasks")
    for kind, entries in topology.items():
        for entry in entries:
            assert entry in definitions[kind], f"{kind}: {entry} missing or different"


def test_definitions_have_the_failures_queue(definitions: dict[str, Any]) -> None:
    queue = next(q for q in definitions["queues"] if q["name"] == "domain.tasks.failures")
    assert queue["durable"] is True and queue["arguments"] == {"x-queue-type": "quorum"}
    binding = next(b for b in definitions["bindings"] if b["destination"] == "domain.tasks.failures")
    assert (binding["source"], binding["routing_key"], binding["destination_type"]) == (
        "domain.tasks",
        "*.execute_failure",
        "queue",
    )
    # Nothing beyond the bridge's topology and this queue.
    topology = describe("domain.tasks")
    assert len(definitions["queues"]) == len(topology["queues"]) + 1
    assert len(definitions["exchanges"]) == len(topology["exchanges"])


def test_definitions_create_the_demo_user(definitions: dict[str, Any]) -> None:
    # Importing definitions at boot replaces the default guest user: the file must bring its own.
    user = next(u for u in definitions["users"] if u["name"] == "bridge")
    assert _rabbit_password_matches(user, "bridge")
    assert not _rabbit_password_matches(user, "guest")
    assert {"name": "/"} in [{"name": v["name"]} for v in definitions["vhosts"]]
    permission = next(p for p in definitions["permissions"] if p["user"] == "bridge")
    assert permission["vhost"] == "/"
    topology = describe("domain.tasks")
    names = [e["name"] for e in topology["exchanges"]] + [q["name"] for q in topology["queues"]]
    for right in ("configure", "write", "read"):
        for name in [*names, "domain.tasks.tail.0123abcd"]:  # its topology, and the demo's temporary queues
            assert re.search(permission[right], name), f"bridge cannot {right} {name}"
        for name in ("domain.tasks.failures", "amq.gen-abc", "other", "domain.tasksx"):
            assert not re.search(permission[right], name), f"bridge may {right} {name}"
    # The leader locks (bridge.leadership): declared and consumed, never written to.
    locks = [lock_name("domain.tasks", account) for account in ("default", "reseller-eu")]
    for right in ("configure", "read"):
        for name in locks:
            assert re.search(permission[right], name), f"bridge cannot {right} the lock {name}"
    for name in locks:
        assert not re.search(permission["write"], name), f"bridge may write {name}"
    assert not re.search(permission["read"], "domain.tasks.leader.")


def test_definitions_give_the_other_demo_users_their_passwords(definitions: dict[str, Any]) -> None:
    users = {u["name"]: u for u in definitions["users"]}
    assert set(users) == {"bridge", "observer", "consumer"}
    for name in ("observer", "consumer"):
        assert _rabbit_password_matches(users[name], name)
        assert users[name]["tags"] == ""  # no management UI, no policies
    assert {p["user"] for p in definitions["permissions"]} == set(users)


# --- metric names, alert rules, dashboard ---

# The metrics labelled by account (docs/operating.md#several-accounts), the label first.
ACCOUNT_METRICS = (
    "bridge_polls_total",
    "bridge_upstream_requests_total",
    "bridge_upstream_request_duration_seconds",
    "bridge_details_received_total",
    "bridge_events_published_total",
    "bridge_acknowledgements_total",
    "bridge_invalid_records_total",
    "bridge_details_returned_after_ack_total",
    "bridge_conflicting_details_total",
    "bridge_ack_results_unusable_total",
    "bridge_confirmed_unacknowledged",
    "bridge_ack_batch_size",
    "bridge_upstream_backlog",
    "bridge_last_successful_poll_timestamp_seconds",
    "bridge_leader",
    "bridge_leader_transitions_total",
    "bridge_account_failing",
)


def _metric_tokens(text: str) -> set[str]:
    return set(re.findall(r"\b(?:bridge|process|python)_[a-z_]+", text))


@pytest.mark.parametrize(
    "path",
    [
        DEPLOY / "prometheus" / "alerts.yml",
        DEPLOY / "prometheus" / "alerts.test.yml",
        DEPLOY / "grafana" / "dashboards" / "task-bridge.json",
    ],
    ids=lambda p: p.name,
)
def test_metric_names_exist(path: Path) -> None:
    used = _metric_tokens(path.read_text(encoding="utf-8"))
    assert used
    metrics = Metrics()
    metrics.account("default")  # the per-account samples exist once an account has them
    Leadership("default", "domain.tasks", metrics.leadership)  # the election's samples exist per account
    unknown = sorted(used - metrics.names())
    assert not unknown, f"{path.name} uses metrics bridge/metrics.py does not export: {unknown}"


def _alert_rules() -> list[dict[str, Any]]:
    groups = _yaml(DEPLOY / "prometheus" / "alerts.yml")["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_alert_rules_are_complete() -> None:
    rules = _alert_rules()
    for rule in rules:
        assert "for" in rule, rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
    expressions = {rule["alert"]: rule["expr"] for rule in rules}
    required = {
        "up == 0": "up{",
        "poll age": "bridge_last_successful_poll_timestamp_seconds > on (job, instance) group_left process_start",
        "failing polls": 'bridge_polls_total{outcome="error"}',
        "publish failures": 'bridge_events_published_total{outcome!="ack"}[2m]',
        "confirmed unacknowledged": "bridge_confirmed_unacknowledged",
        "invalid records": "increase(bridge_invalid_records_total",
        "backlog": "bridge_upstream_backlog - bridge_upstream_backlog offset 30m",
        "broker": "bridge_broker_connected == 0",
        "unrouted queue": 'rabbitmq_detailed_queue_messages_ready{queue=~".+\\\\.unrouted"}',
        "invalid queue": 'rabbitmq_detailed_queue_messages_ready{queue=~".+\\\\.invalid"}',
        "no leader for an account": "max by (job, account) (bridge_leader) == 0",
        "two leaders of an account": "sum by (job, account) (bridge_leader) > 1",
        "a standby is not a bridge that stopped polling": "unless on (job, instance, account) bridge_leader == 0",
        "a parked account": "max by (job, account) (bridge_account_failing) == 1",
    }
    for what, fragment in required.items():
        assert any(fragment in expr for expr in expressions.values()), f"no alert on {what}"
    # Several accounts in one process: an alert on a metric labelled by account keeps the label (fires for that
    # account alone) and names the account; the process-wide ones (scrape, broker connection) have none.
    per_account = {name for name in ACCOUNT_METRICS if name != "bridge_leader_transitions_total"}
    for rule in rules:
        used = set(re.findall(r"\b(bridge_[a-z_]+?)(?:_bucket|_count|_sum)?\b", rule["expr"]))
        if not used & per_account:
            continue
        aggregations = re.findall(r"\b(?:sum|max|min|avg|count) by \(([^)]*)\)", rule["expr"])
        assert all("account" in labels for labels in aggregations), f"{rule['alert']} aggregates the account away"
        annotations = rule["annotations"]
        assert "{{ $labels.account }}" in annotations["summary"], rule["alert"]
        assert "{{ $labels.account }}" in annotations["description"], rule["alert"]


def test_alert_rules_check_and_unit_tests_pass() -> None:
    promtool = _promtool()
    prometheus = DEPLOY / "prometheus"
    for argv in (
        [promtool, "check", "rules", "alerts.yml"],
        [promtool, "check", "config", "prometheus.yml"],
        [promtool, "test", "rules", "alerts.test.yml"],
    ):
        result = _run(argv, prometheus)
        assert result.returncode == 0, f"{' '.join(argv[1:])}:\n{result.stdout}\n{result.stderr}"
    tested = set(re.findall(r"alertname: (\w+)", (prometheus / "alerts.test.yml").read_text(encoding="utf-8")))
    assert len(tested & {rule["alert"] for rule in _alert_rules()}) >= 3


def test_every_alert_has_a_true_positive_and_a_quiet_case() -> None:
    tests = _yaml(DEPLOY / "prometheus" / "alerts.test.yml")["tests"]
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in tests:
        for check in case["alert_rule_test"]:
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    alerts = {rule["alert"] for rule in _alert_rules()}
    assert alerts <= fires, f"no promtool case where these fire: {sorted(alerts - fires)}"
    assert alerts <= quiet, f"no promtool case where these stay quiet: {sorted(alerts - quiet)}"


def test_every_per_account_alert_is_tested_with_two_accounts() -> None:
    # The one in trouble fires, and the healthy account beside it (same process) is not in the expected alerts.
    per_account = {name for name in ACCOUNT_METRICS if name != "bridge_leader_transitions_total"}
    alerts = {
        rule["alert"]
        for rule in _alert_rules()
        if set(re.findall(r"\b(bridge_[a-z_]+?)(?:_bucket|_count|_sum)?\b", rule["expr"])) & per_account
    }
    assert len(alerts) >= 9
    covered = set()
    for case in _yaml(DEPLOY / "prometheus" / "alerts.test.yml")["tests"]:
        accounts = {a for s in case["input_series"] for a in re.findall(r'account="([^"]+)"', s["series"])}
        if len(accounts) < 2:
            continue
        for check in case["alert_rule_test"]:
            fired = {alert["exp_labels"].get("account") for alert in check.get("exp_alerts") or []}
            if fired and None not in fired and fired < accounts:
                covered.add(check["alertname"])
    assert alerts <= covered, f"no two-account promtool case where one fires alone: {sorted(alerts - covered)}"


def test_every_alert_has_a_runbook_section() -> None:
    runbook = (ROOT / "docs" / "runbook.md").read_text(encoding="utf-8")
    sections = re.findall(r"^## (\w+)$", runbook, flags=re.MULTILINE)
    alerts = [rule["alert"] for rule in _alert_rules()]
    assert sorted(sections) == sorted(alerts), "one runbook section per alert, named after it"
    for rule in _alert_rules():
        # GitHub's anchor for a heading of one word is that word in lower case.
        assert rule["annotations"]["runbook_url"] == f"docs/runbook.md#{rule['alert'].lower()}", rule["alert"]
    for section in re.split(r"^## ", runbook, flags=re.MULTILINE)[1:]:
        assert "**Means:**" in section and "**Do:**" in section, section.splitlines()[0]


def test_process_metrics_are_exported() -> None:
    metrics = Metrics()
    metrics.account("default")
    names = metrics.names()
    for name in ("process_start_time_seconds", "process_cpu_seconds_total", "process_resident_memory_bytes"):
        assert name in names
    assert "python_info" in names


def _dashboard_panels() -> list[dict[str, Any]]:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "task-bridge.json").read_text(encoding="utf-8"))
    return [panel for panel in dashboard["panels"] if panel["type"] != "row"]


def test_dashboard_covers_the_drain(tmp_path: Path) -> None:
    panels = _dashboard_panels()
    assert len({p["id"] for p in panels}) == len(panels)
    exprs = [t["expr"] for panel in panels for t in panel["targets"]]
    assert all(panel["targets"] and "gridPos" in panel for panel in panels)
    text = "\n".join(exprs)
    for needed in (
        "bridge_details_received_total",
        "bridge_events_published_total",
        "bridge_acknowledgements_total",
        "bridge_upstream_request_duration_seconds_bucket",
        "bridge_upstream_requests_total",
        "bridge_publish_confirm_duration_seconds_bucket",
        "bridge_publishes_in_flight",
        "bridge_confirmed_unacknowledged",
        "bridge_upstream_backlog",
        "bridge_invalid_records_total",
        "bridge_broker_connected",
        "bridge_last_successful_poll_timestamp_seconds",
        "sum by (account) (bridge_leader",
        "bridge_leader_transitions_total",
    ):
        assert needed in text, f"no panel shows {needed}"
    assert "histogram_quantile(0.99" in text and "histogram_quantile(0.5" in text


def test_dashboard_shows_each_account(tmp_path: Path) -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "task-bridge.json").read_text(encoding="utf-8"))
    variable = next(v for v in dashboard["templating"]["list"] if v["name"] == "account")
    assert variable["type"] == "query" and variable["multi"] is True and variable["includeAll"] is True
    assert variable["definition"] == variable["query"]["query"] == "label_values(bridge_polls_total, account)"
    assert variable["allValue"] == ".*"
    per_account = re.compile(r"\b(" + "|".join(ACCOUNT_METRICS) + r")(?:_bucket)?\{([^}]*)\}")
    shown = set()
    for panel in _dashboard_panels():
        for target in panel["targets"]:
            expr = target["expr"]
            for metric, selector in per_account.findall(expr):
                shown.add(metric)
                assert 'account=~"$account"' in selector, f"{panel['title']}: {metric} ignores the account variable"
            if per_account.search(expr):
                # One line per account: its legend names the account, and no sum or max adds accounts together.
                assert "{{account}}" in target["legendFormat"], panel["title"]
                for labels in re.findall(r"\b(?:sum|max|min|avg) by \(([^)]*)\)", expr):
                    assert "account" in labels, f"{panel['title']} adds accounts together"
    assert "bridge_account_failing" in shown


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    promtool = _promtool()
    rules = []
    for panel in _dashboard_panels():
        for target in panel["targets"]:
            # Grafana's variables, replaced by what they expand to, so promtool can parse the query.
            expr = target["expr"].replace("$__rate_interval", "5m").replace("$instance", ".*").replace("$account", ".*")
            rules.append({"record": f"dashboard:panel_{panel['id']}_{target['refId']}", "expr": expr})
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}), encoding="utf-8")
    result = _run([promtool, "check", "rules", str(path)], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


# --- a tiny HTTP server for the health-check commands ---


@pytest.fixture
def unused_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Handler(http.server.BaseHTTPRequestHandler):
    statuses: ClassVar[dict[str, int]] = {}

    def do_GET(self) -> None:
        status = self.statuses.get(self.path, self.statuses.get("/", 404))
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # keep the test output clean
        pass


@contextlib.contextmanager
def _http_server(port: int, statuses: dict[str, int]) -> Iterator[None]:
    """Answers GET with ``statuses[path]`` (or ``statuses["/"]``, else 404) on 127.0.0.1:``port``."""
    handler = type("Handler", (_Handler,), {"statuses": statuses})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_helpers_match_docker_ignore_semantics() -> None:
    patterns = [(False, "*"), (True, "bridge"), (False, "**/__pycache__")]
    assert _ignored("README.md", patterns)
    assert not _ignored("bridge/app.py", patterns)
    assert _ignored("bridge/__pycache__/app.pyc", patterns)
