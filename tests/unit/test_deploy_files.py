"""The deployment files in deploy/ stay in step with the CLI they run.

Every trustmesh command line in the compose file, the Kubernetes manifests and the systemd
units is parsed by the real argument parser, every config file is loaded by the real config
code, and the topology (3 etcd members, 3 replicas that list them all) is checked.
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from trustmesh.cli import agent_run_cmd, server_cmd
from trustmesh.cli.main import build_parser

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _parse(argv: list[str]) -> argparse.Namespace:
    try:
        return build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse exits on an unknown flag or a bad value
        raise AssertionError(f"`trustmesh {' '.join(argv)}` does not parse with the real CLI") from exc


def _yaml_files() -> list[Path]:
    # Helm templates are YAML only once rendered: tests/unit/test_deploy.py renders and checks them.
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml") and "templates" not in p.parts)


def _docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _compose() -> dict[str, Any]:
    doc: dict[str, Any] = _docs(DEPLOY / "compose" / "docker-compose.yml")[0]
    return doc


def _compose_commands() -> dict[str, list[str]]:
    out = {}
    for name, service in _compose()["services"].items():
        if str(service.get("image", "")).startswith("trustmesh") or "build" in service:
            out[name] = shlex.split(service["command"])
    return out


def _k8s_commands() -> list[list[str]]:
    out = []
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        for doc in _docs(path):
            spec = doc.get("spec", {}).get("template", {}).get("spec", {})
            for container in spec.get("containers", []):
                if container["image"].startswith("trustmesh"):
                    out.append(list(container["args"]))
    return out


def _systemd_commands() -> list[list[str]]:
    out = []
    for unit in sorted((DEPLOY / "systemd").glob("*.service")):
        for line in unit.read_text().splitlines():
            if line.startswith("ExecStart="):
                argv = shlex.split(line.removeprefix("ExecStart="))
                assert argv[0].endswith("/trustmesh"), line
                out.append([a.replace("%d", "/run/credentials/unit") for a in argv[1:]])
    return out


def test_every_yaml_file_parses() -> None:
    files = _yaml_files()
    assert len(files) >= 8
    for path in files:
        assert _docs(path), f"{path} is empty"


def test_every_command_line_parses_with_the_real_cli() -> None:
    commands = list(_compose_commands().values()) + _k8s_commands() + _systemd_commands()
    assert len(commands) >= 3 + 1 + 1 + 2
    for argv in commands:
        args = _parse(argv)
        assert args.command in ("server", "agent"), argv


def test_a_wrong_flag_would_be_caught() -> None:
    # The check above can fail: a flag the CLI does not have is refused.
    with pytest.raises(AssertionError, match="does not parse"):
        _parse(["server", "run", "--trust-domian", "example.org"])


def test_compose_is_three_replicas_on_three_etcd_members() -> None:
    services = _compose()["services"]
    etcd = sorted(n for n, s in services.items() if "etcd" in str(s.get("image", "")) or n.startswith("etcd"))
    assert etcd == ["etcd1", "etcd2", "etcd3"]
    servers = {n: argv for n, argv in _compose_commands().items() if argv[:2] == ["server", "run"]}
    assert len(servers) == 3
    ids = set()
    for argv in servers.values():
        args = _parse(argv)
        assert args.store.startswith("etcd+https://") and all(f"etcd{i}:2379" in args.store for i in (1, 2, 3))
        assert args.kek_file == "/run/secrets/kek"
        assert (args.etcd_ca, args.etcd_cert, args.etcd_key) == (
            "/run/secrets/etcd-ca", "/run/secrets/etcd-cert", "/run/secrets/etcd-key")
        ids.add(args.replica_id)
    assert len(ids) == 3, "each replica has its own replica id"
    agent = _parse(_compose_commands()["agent"])
    assert len(agent.server) == 3 and len(agent.attest_server) == 3


def test_kubernetes_topology() -> None:
    kinds: dict[str, dict[str, Any]] = {}
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        for doc in _docs(path):
            if "kind" in doc and "metadata" in doc and "name" in doc["metadata"]:
                kinds[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    assert kinds["StatefulSet/etcd"]["spec"]["replicas"] == 3
    assert kinds["Deployment/trustmesh-server"]["spec"]["replicas"] == 3
    assert "DaemonSet/trustmesh-agent" in kinds
    assert "NetworkPolicy/etcd" in kinds and "PodDisruptionBudget/etcd" in kinds
    kustomization = _docs(DEPLOY / "kubernetes" / "kustomization.yaml")[0]
    for resource in kustomization["resources"]:
        assert (DEPLOY / "kubernetes" / resource).exists(), resource
    server = next(a for a in _k8s_commands() if a[:2] == ["server", "run"])
    args = _parse(server)
    assert all(f"etcd-{i}.etcd:2379" in args.store for i in range(3))
    assert args.store.startswith("etcd+https://") and args.etcd_ca and args.etcd_cert and args.etcd_key
    etcd = " ".join(kinds["StatefulSet/etcd"]["spec"]["template"]["spec"]["containers"][0]["command"])
    assert "--client-cert-auth" in etcd and "--peer-client-cert-auth" in etcd and "http://0.0.0.0:2379" not in etcd


def test_config_files_load_with_the_real_config_code() -> None:
    server_args = _parse(["server", "run", "--config", str(DEPLOY / "systemd" / "server.yaml")])
    config = server_cmd._build_config(server_args)
    assert config.store.startswith("etcd+https://") and config.etcd_ca and config.etcd_cert
    for path in (DEPLOY / "systemd" / "agent.yaml", DEPLOY / "agent.example.yaml"):
        agent_args = _parse(["agent", "run", "--config", str(path)])
        assert agent_run_cmd._build_config(agent_args).server
    server_cmd._build_config(_parse(["server", "run", "--config", str(DEPLOY / "server.example.yaml")]))


def test_no_secret_is_checked_in() -> None:
    for path in DEPLOY.rglob("*"):
        if path.is_file():
            text = path.read_text(errors="replace")
            assert "PRIVATE KEY" not in text, path
            assert not re.search(r"\b[0-9a-fA-F]{64}\b", text), f"{path} holds what looks like a KEK"


def test_join_token_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    values: dict[str, Any] = {"join_token": None, "join_token_file": None}
    monkeypatch.delenv(agent_run_cmd.TOKEN_ENV, raising=False)
    assert agent_run_cmd._join_token(values) is None
    monkeypatch.setenv(agent_run_cmd.TOKEN_ENV, " from-env\n")
    assert agent_run_cmd._join_token(values) == "from-env"
    values["join_token_file"] = str(tmp_path / "missing")
    assert agent_run_cmd._join_token(values) is None, "a missing file means: attested before"
    (tmp_path / "token").write_text("from-file\n")
    values["join_token_file"] = str(tmp_path / "token")
    assert agent_run_cmd._join_token(values) == "from-file"
    values["join_token"] = "from-flag"
    assert agent_run_cmd._join_token(values) == "from-flag"


def test_the_dockerfile_copies_what_exists_and_runs_unprivileged() -> None:
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    root = DEPLOY.parent
    copies = [line.split()[1:-1] for line in text.splitlines() if line.startswith("COPY ")]
    assert copies
    for sources in copies:
        for source in sources:
            assert (root / source).exists(), f"Dockerfile copies {source}, which is not in the repository"
    assert re.search(r"^USER 10001", text, re.M) and 'ENTRYPOINT ["trustmesh"]' in text
