"""The deployment files (compose.yaml, Dockerfile, deploy/, docs/sandbox-gateway.service), checked without a
container engine: the compose file against the Compose Specification schema and against the repository (the
files it names, the GATEWAY_* variables it sets, the ports of the config it mounts), the Dockerfile against
the repository and scripts/setup, the entrypoint run as the image would run it, the unit with systemd-analyze."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft7Validator  # type: ignore[import-untyped]

from gateway.engine.config import EgressConfig
from gateway.settings import SECTIONS, load_config
from tests.factory import REPO, clean_env, free_port, wait_until
from tests.redis_server import find_redis_server

COMPOSE = REPO / "compose.yaml"
ENTRYPOINT = REPO / "deploy" / "entrypoint.sh"
VENV_BIN = Path(shutil.which("gateway") or REPO / ".venv" / "bin" / "gateway").parent


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def gateway_service() -> dict[str, Any]:
    service: dict[str, Any] = compose()["services"]["gateway"]
    return service


def container_env() -> dict[str, str]:
    """The gateway's environment as compose gives it, with the interpolated token set as an operator sets it."""
    tokens = '[{name="platform", token="a-long-random-secret-value-0123", scopes=["admin"]}]'
    env = {}
    for key, value in gateway_service()["environment"].items():
        env[key] = tokens if str(value).startswith("${GATEWAY_API__TOKENS") else str(value)
    return env


def test_compose_file_is_valid_against_the_compose_specification() -> None:
    schema = json.loads((REPO / "tests" / "data" / "compose-spec.json").read_text())
    errors = sorted(Draft7Validator(schema).iter_errors(compose()), key=str)
    assert errors == [], "\n".join(e.message for e in errors)


def test_the_schema_check_refuses_what_compose_would_refuse() -> None:
    schema = json.loads((REPO / "tests" / "data" / "compose-spec.json").read_text())
    broken = compose()
    broken["services"]["gateway"]["cap_add"] = "NET_ADMIN"  # a string where compose wants a list
    assert list(Draft7Validator(schema).iter_errors(broken))


def test_compose_gateway_is_started_as_an_operator_starts_it() -> None:
    service = gateway_service()
    assert service["command"][:3] == ["run", "--data-plane", "--steer"]
    assert service["command"][3] == "--config"
    assert "NET_ADMIN" in service["cap_add"]
    assert service["sysctls"]["net.ipv4.ip_forward"] == "1"
    assert "/readyz" in " ".join(service["healthcheck"]["test"])
    redis = compose()["services"]["redis"]["command"]
    assert redis[redis.index("--appendonly") + 1] == "yes"
    assert redis[redis.index("--appendfsync") + 1] == "always"


def test_every_file_compose_names_exists_or_is_made_by_the_documented_step() -> None:
    data = compose()
    readme = (REPO / "README.md").read_text()
    documented = {"certs/tunnel.crt", "certs/tunnel.key"}  # `gateway certs init --dir certs`
    assert "gateway certs init --dir certs" in readme and "gateway certs init --dir certs" in COMPOSE.read_text()
    for kind in ("configs", "secrets"):
        for entry in data[kind].values():
            name = entry["file"].removeprefix("./")
            assert (REPO / name).is_file() or name in documented, name
    for service in data["services"].values():
        if "build" in service:
            assert (REPO / service["build"] / "Dockerfile").is_file()


def test_compose_env_vars_are_options_the_config_loader_accepts() -> None:
    env = container_env()
    for name in env:
        assert name.startswith("GATEWAY_") and "__" in name, name
        section, _, key = name.removeprefix("GATEWAY_").lower().partition("__")
        model = SECTIONS.get(section)
        assert model is not None and key in model.__struct_fields__, name
    config = load_config(REPO / "deploy" / "gateway.toml", env)
    assert config.store.backend == "redis" and config.store.redis_url == env["GATEWAY_STORE__REDIS_URL"]


def test_compose_ports_secrets_and_addresses_agree_with_the_container_config() -> None:
    service = gateway_service()
    config = load_config(REPO / "deploy" / "gateway.toml", container_env())
    targets = {int(spec.rsplit(":", 1)[1]) for spec in service["ports"]}
    assert targets == {config.api.port, config.tunnel.port}
    mounted = {entry["target"] for entry in service["configs"]}
    assert mounted == {service["command"][4]}
    secrets = {f"/run/secrets/{name}" for name in service["secrets"]}
    assert {str(config.tunnel.cert_path), str(config.tunnel.key_path)} <= secrets
    sandboxes = service["networks"]["sandboxes"]
    assert config.egress.sandbox_interfaces == (sandboxes["interface_name"],)
    subnet = compose()["networks"]["sandboxes"]["ipam"]["config"][0]["subnet"]
    assert any(str(net) == "10.75.0.0/16" for net in config.network.sandbox_subnets) and subnet.startswith("10.75.")
    sandbox = compose()["services"]["sandbox"]
    assert f"via {sandboxes['ipv4_address']}" in " ".join(sandbox["entrypoint"])
    assert compose()["networks"]["sandboxes"]["internal"] is True  # its only way out is the gateway


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def test_dockerfile_copy_sources_exist_and_apt_packages_match_setup() -> None:
    instructions = dockerfile_instructions()
    assert instructions[0][0] == "FROM" and instructions[0][1].startswith("python:3.12-slim")
    for op, rest in instructions:
        if op == "COPY":
            for source in shlex.split(rest)[:-1]:
                assert (REPO / source).exists(), source
    (apt,) = [rest for op, rest in instructions if op == "RUN" and "apt-get install" in rest]
    words = apt.split("apt-get install", 1)[1].split("&&", 1)[0].split()
    installed = {w for w in words if not w.startswith("-")}
    setup = re.search(r"^packages=\(([^)]*)\)", (REPO / "scripts" / "setup").read_text(), re.M)
    assert setup is not None
    assert installed == set(setup.group(1).split())
    assert any(op == "RUN" and "pip install" in rest and " ." in rest for op, rest in instructions)


# --------------------------------------------------------------------------- the entrypoint


def entrypoint(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    path = f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}"
    return subprocess.run(
        [str(ENTRYPOINT), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(PATH=path, **env),
        check=False,
    )


def test_entrypoint_refuses_a_missing_config(tmp_path: Path) -> None:
    done = entrypoint(tmp_path, "run", "--config", str(tmp_path / "gateway.toml"))
    assert done.returncode == 2
    assert "ENTRYPOINT_NO_CONFIG" in done.stderr and str(tmp_path / "gateway.toml") in done.stderr
    done = entrypoint(tmp_path, "run")
    assert done.returncode == 2 and "ENTRYPOINT_NO_CONFIG" in done.stderr


def test_entrypoint_refuses_missing_certificates(tmp_path: Path) -> None:
    env = container_env() | {"GATEWAY_TUNNEL__CERT_PATH": str(tmp_path / "absent.crt")}
    done = entrypoint(tmp_path, "run", "--config", str(REPO / "deploy" / "gateway.toml"), **env)
    assert done.returncode == 2
    assert "CERT_INVALID" in done.stderr and "ENTRYPOINT_CONFIG_INVALID" in done.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="the data plane needs root (its own network namespace)")
def test_entrypoint_starts_the_compose_command_on_redis(tmp_path: Path) -> None:
    """The compose command through the entrypoint, in a network namespace of its own (steering changes the
    namespace it runs in), with the compose environment; Redis runs in that namespace too, as the `redis`
    service beside it, and only the addresses and ports are this test's own."""
    certs = tmp_path / "certs"
    init = subprocess.run(
        [str(VENV_BIN / "gateway"), "certs", "init", "--dir", str(certs)], capture_output=True, text=True, check=False
    )
    assert init.returncode == 0, init.stderr
    netns = f"gwdeploy{os.getpid()}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    redis_proc: subprocess.Popen[bytes] | None = None
    process: subprocess.Popen[str] | None = None
    try:
        subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
        redis_port, api_port = free_port(), free_port()
        redis_dir = tmp_path / "redis"
        redis_dir.mkdir()
        redis_proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                netns,
                find_redis_server(),
                "--port",
                str(redis_port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(redis_dir),
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        env = container_env() | {
            "GATEWAY_STORE__REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
            "GATEWAY_API__PORT": str(api_port),
            "GATEWAY_TUNNEL__PORT": str(free_port()),
            "GATEWAY_TUNNEL__CERT_PATH": str(certs / "tunnel.crt"),
            "GATEWAY_TUNNEL__KEY_PATH": str(certs / "tunnel.key"),
            "GATEWAY_AUDIT__DIR": str(tmp_path / "audit"),
            "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        }
        command = gateway_service()["command"]
        command[command.index("--config") + 1] = str(REPO / "deploy" / "gateway.toml")
        process = subprocess.Popen(
            ["ip", "netns", "exec", netns, str(ENTRYPOINT), *command],
            cwd=tmp_path,
            env=clean_env(**env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

        def ready() -> bool:
            assert process is not None and process.poll() is None, process and process.stdout and process.stdout.read()
            probe = subprocess.run(
                [
                    "ip",
                    "netns",
                    "exec",
                    netns,
                    str(VENV_BIN / "python"),
                    "-c",
                    f"import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:{api_port}/readyz').status)",
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            return probe.stdout.strip() == "200"

        assert wait_until(ready, timeout=30)
    finally:
        for proc in (process, redis_proc):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=15)
        subprocess.run(["ip", "netns", "del", netns], check=False)


# --------------------------------------------------------------------------- the systemd unit


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    text = (REPO / "docs" / "sandbox-gateway.service").read_text()
    assert "After=network-online.target redis-server.service" in text
    lines = text.splitlines()
    for line in ("Restart=on-failure", "AmbientCapabilities=CAP_NET_ADMIN", "KillSignal=SIGTERM"):
        assert line in lines
    assert "ExecReload=/bin/kill -HUP $MAINPID" in lines  # SIGHUP re-reads the configuration
    # systemd must wait out the drain before it kills.
    stop = next(line for line in lines if line.startswith("TimeoutStopSec="))
    assert float(stop.removeprefix("TimeoutStopSec=").removesuffix("s")) > EgressConfig().drain_timeout + 10
    assert "gateway run --data-plane --steer --config" in text
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is not installed (scripts/setup --test installs apt systemd)")
    unit = tmp_path / "sandbox-gateway.service"
    unit.write_text(text.replace("/opt/sandbox-gateway/.venv/bin/gateway", str(VENV_BIN / "gateway")))
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and done.stderr == "", done.stderr
