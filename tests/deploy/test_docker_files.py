"""Dockerfile, compose file and env example agree with the code: ports, routes, command, settings, volumes."""

import json
import re
import tomllib
from pathlib import Path

import pytest
from dockerfiles import REPO, Instruction, env_assignments, final_stage, loraplex_variables
from fastapi.testclient import TestClient

from loraplex.cli import build_parser
from loraplex.settings import Settings
from server.app import create_app

ENV_EXAMPLE = REPO / "deploy" / "loraplex.env.example"


def _one(instructions: list[Instruction], keyword: str) -> str:
    (found,) = [ins.args for ins in final_stage(instructions) if ins.keyword == keyword]
    return found


def _exposed_port(dockerfile: list[Instruction]) -> int:
    return int(_one(dockerfile, "EXPOSE").split("/")[0])


def test_exposed_port_is_the_default_port(dockerfile: list[Instruction]) -> None:
    assert _exposed_port(dockerfile) == Settings.model_fields["port"].default


def test_healthcheck_probes_a_route_of_the_app(dockerfile: list[Instruction]) -> None:
    healthcheck = _one(dockerfile, "HEALTHCHECK")
    (path,) = re.findall(r"http://127\.0\.0\.1:[^/]+(/[\w/-]*)", healthcheck)
    app = create_app(Settings())
    assert path in {getattr(route, "path", None) for route in app.routes}  # included routers have no path
    # no `with`: the lifespan (model loading) does not run, and the probe must answer all the same
    assert TestClient(app).get(path).status_code == 200
    (fallback,) = re.findall(r"'LORAPLEX_PORT', '(\d+)'", healthcheck)  # the port when LORAPLEX_PORT is unset
    assert int(fallback) == _exposed_port(dockerfile)


def test_entrypoint_is_the_console_script_serve_command(dockerfile: list[Instruction]) -> None:
    entrypoint = json.loads(_one(dockerfile, "ENTRYPOINT"))
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts[entrypoint[0]] == "loraplex.cli:main"
    args = build_parser().parse_args(entrypoint[1:])
    assert args.command == "serve"


def test_every_loraplex_variable_is_a_setting(dockerfile: list[Instruction]) -> None:
    fields = {f"LORAPLEX_{name.upper()}" for name in Settings.model_fields}
    for path in ("Dockerfile", "docker-compose.yml", "deploy/loraplex.env.example"):
        unknown = loraplex_variables((REPO / path).read_text()) - fields
        assert not unknown, f"{path} sets {unknown}, which are not Settings fields"


def test_env_example_values_are_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.base_model is None and settings.admin_key == []  # empty means "not set"


def test_volumes_are_the_adapter_and_cache_dirs(dockerfile: list[Instruction], service: dict) -> None:
    env = env_assignments(final_stage(dockerfile))
    dirs = {env["LORAPLEX_ADAPTER_DIR"], env["LORAPLEX_CACHE_DIR"]}
    assert set(json.loads(_one(dockerfile, "VOLUME"))) == dirs
    assert {volume.split(":")[1] for volume in service["volumes"]} == dirs
    assert env["LORAPLEX_HOST"] == "0.0.0.0"  # reachable through the published port
    assert Path(env["HF_HOME"]).is_relative_to(env["LORAPLEX_CACHE_DIR"])  # hub downloads survive upgrades


def test_compose_publishes_the_exposed_port(dockerfile: list[Instruction], service: dict) -> None:
    targets = {int(str(mapping).split(":")[-1].split("/")[0]) for mapping in service["ports"]}
    assert targets == {_exposed_port(dockerfile)}


def test_compose_reserves_a_gpu_and_restarts(service: dict) -> None:
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert service["restart"] in {"always", "unless-stopped"}


def test_compose_env_file_has_its_example(service: dict) -> None:
    (env_file,) = service["env_file"]
    assert (REPO / (env_file["path"] + ".example")).resolve() == ENV_EXAMPLE


def test_runs_as_non_root(dockerfile: list[Instruction]) -> None:
    user = [ins.args for ins in final_stage(dockerfile) if ins.keyword == "USER"][-1]
    assert user.split(":")[0] not in {"root", "0"}


def test_build_context_holds_every_package() -> None:
    """.dockerignore is an allowlist: a new top-level package must be added to it, or `pip install .` misses it."""
    allowed = {line[1:].rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines() if line[:1] == "!"}
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = project["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {p.name for p in REPO.iterdir() if (p / "__init__.py").is_file()}
    wanted = {name for name in packages if any(re.fullmatch(pat.replace("*", ".*"), name) for pat in patterns)}
    assert wanted <= allowed
    assert {"pyproject.toml", project["project"]["readme"]} <= allowed
