"""docker-compose.yml (+ the CPU override) through Docker Compose v2's own `config` command.

`docker compose config` parses, interpolates, merges and validates against the Compose
specification without talking to an engine, so it runs here for real.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.conftest import ROOT, compose_tool, run

BASE = ROOT / "docker-compose.yml"
CPU = ROOT / "docker-compose.cpu.yml"


def compose_config(*files: Path, cwd: Path = ROOT) -> dict[str, Any]:
    cmd = [compose_tool(), "--project-directory", str(ROOT)]
    for file in files:
        cmd += ["-f", str(file)]
    result = run([*cmd, "config", "--format", "json"], cwd=cwd)
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = json.loads(result.stdout)
    return config


def test_compose_is_docker_compose_v2() -> None:
    result = run([compose_tool(), "version", "--short"])
    assert result.returncode == 0
    assert result.stdout.strip().startswith("2.")


def test_gpu_default_reserves_one_nvidia_gpu() -> None:
    config = compose_config(BASE)
    assert set(config["services"]) == {"api", "prometheus", "grafana"}
    api = config["services"]["api"]
    assert api["build"]["target"] == "gpu"
    assert api["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    ]


def test_cpu_override_drops_the_gpu_and_builds_the_cpu_target() -> None:
    api = compose_config(BASE, CPU)["services"]["api"]
    assert api["build"]["target"] == "cpu"
    assert api["image"] == "longhaul:cpu"
    assert "devices" not in api.get("deploy", {}).get("resources", {}).get("reservations", {})


def test_compose_rejects_a_malformed_gpu_reservation(tmp_path: Path) -> None:
    """The validator really checks the device reservation: `capabilities` must be a list."""
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(BASE.read_text().replace("capabilities: [gpu]", "capabilities: gpu"))
    cmd = [compose_tool(), "--project-directory", str(ROOT), "-f", str(broken), "config", "-q"]
    result = run(cmd)
    assert result.returncode != 0
    assert "capabilities" in result.stderr


def test_volumes_ports_and_mounts() -> None:
    config = compose_config(BASE)
    assert set(config["volumes"]) == {"models", "prometheus-data", "grafana-data"}
    services = config["services"]
    published = {
        name: [(p["published"], p["target"]) for p in service["ports"]]
        for name, service in services.items()
    }
    assert published == {
        "api": [("8000", 8000)],
        "prometheus": [("9090", 9090)],
        "grafana": [("3000", 3000)],
    }
    named = {
        (name, v["source"], v["target"])
        for name, service in services.items()
        for v in service["volumes"]
        if v["type"] == "volume"
    }
    assert named == {
        ("api", "models", "/models"),
        ("prometheus", "prometheus-data", "/prometheus"),
        ("grafana", "grafana-data", "/var/lib/grafana"),
    }
    for service in services.values():
        for v in service["volumes"]:
            if v["type"] == "bind":
                assert Path(v["source"]).exists(), v["source"]
                assert v.get("read_only") is True, v


def test_prometheus_scrapes_the_api_service() -> None:
    import yaml

    config = compose_config(BASE)
    prometheus = config["services"]["prometheus"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    scrape = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    (job,) = scrape["scrape_configs"]
    assert job["job_name"] == "longhaul"
    assert job["static_configs"] == [{"targets": ["api:8000"]}]


def test_grafana_anonymous_access_is_off_by_default() -> None:
    grafana = compose_config(BASE)["services"]["grafana"]
    env = grafana["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert env["GF_USERS_ALLOW_SIGN_UP"] == "false"
    mounts = {v["target"]: v["source"] for v in grafana["volumes"]}
    assert Path(mounts["/etc/grafana/provisioning"]) == ROOT / "deploy/grafana/provisioning"
    dashboards = Path(mounts["/etc/grafana/dashboards"])
    home = env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (dashboards / Path(home).relative_to("/etc/grafana/dashboards")).is_file()


@pytest.mark.parametrize(
    ("variable", "value", "service", "check"),
    [
        ("LONGHAUL_API_PORT", "18000", "api", lambda s: s["ports"][0]["published"] == "18000"),
        (
            "GRAFANA_ANONYMOUS",
            "true",
            "grafana",
            lambda s: s["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true",
        ),
        (
            "LONGHAUL_API_KEYS",
            '["k1"]',
            "api",
            lambda s: s["environment"]["LONGHAUL_API_KEYS"] == '["k1"]',
        ),
    ],
)
def test_documented_variables_take_effect(
    variable: str, value: str, service: str, check: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(variable, value)
    assert check(compose_config(BASE)["services"][service])
    readme = (ROOT / "README.md").read_text()
    assert f"`{variable}`" in readme, f"{variable} is not documented in README.md"


def test_env_defaults_parse_as_settings() -> None:
    """The api environment, as compose renders it, is accepted by the service's Settings."""
    from service.settings import Settings

    env = compose_config(BASE)["services"]["api"]["environment"]
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        settings = Settings()
    assert settings.api_keys == [] and settings.models == []
    assert settings.log_level == "info"


def test_every_compose_variable_is_documented() -> None:
    import re

    variables = set()
    for file in (BASE, CPU):
        variables |= set(re.findall(r"\$\{(\w+)", file.read_text()))
    assert "LONGHAUL_API_PORT" in variables
    readme = (ROOT / "README.md").read_text()
    missing = sorted(v for v in variables if f"`{v}`" not in readme)
    assert not missing, f"compose variables not documented in README.md: {missing}"
