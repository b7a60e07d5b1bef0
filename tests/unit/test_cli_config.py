from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import pytest

from trustmesh.cli import agent_run_cmd, server_cmd
from trustmesh.cli.config import ConfigError, build, load_config_file, resolve
from trustmesh.cli.main import build_parser
from trustmesh.options import HOST_PORT, PATH, TEXT, option

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Small:
    bind: str = option("an address", HOST_PORT, default="d:1")
    data_dir: Path = option("a directory", PATH, default=Path("d"))
    store: str = option("a store", TEXT, default="sqlite")


def test_flags_beat_the_file_which_beats_defaults(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data-dir: /from/file\nbind: 1.2.3.4:1\n")
    args = argparse.Namespace(bind="5.6.7.8:2", data_dir=None)
    out = build(Small, resolve(Small, args, str(cfg)))
    assert out == Small(bind="5.6.7.8:2", data_dir=Path("/from/file"), store="sqlite")


@pytest.mark.parametrize(("text", "message"), [("- a\n- b\n", "mapping"), ("a: [\n", "not valid YAML"),
                                               ("unknown: 1\n", "unknown option")])
def test_bad_files_are_refused(tmp_path: Path, text: str, message: str) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=message):
        resolve(Small, argparse.Namespace(), str(cfg))


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config_file(tmp_path / "nope.yaml")


def test_the_shipped_example_config_is_valid() -> None:
    parser = build_parser()
    args = parser.parse_args(["server", "run", "--config", str(ROOT / "deploy/server.example.yaml")])
    config = server_cmd._build_config(args)
    assert config.trust_domain.name == "example.org"
    assert config.default_jwt_ttl.total_seconds() == 300


def test_the_shipped_agent_config_is_valid() -> None:
    args = build_parser().parse_args(["agent", "run", "--config", str(ROOT / "deploy/agent.example.yaml")])
    from trustmesh.cli.agent_run_cmd import _build_config

    config = _build_config(args)
    assert config.server == ("cp-1.internal:8081", "cp-2.internal:8081")
    assert config.attest_addresses == ("cp-1.internal:8082", "cp-2.internal:8082")
    ledger, payments = config.services
    assert ledger.inbound.forward == "127.0.0.1:8080"
    assert str(payments.outbound[0].expect) == "spiffe://example.org/ledger"


@pytest.mark.parametrize(("services", "message"), [
    ("services: {a: 1}", "must be a list"),
    ("services: [{name: x}]", "needs name and spiffe_id"),
    ("services: [{name: x, spiffe_id: 'spiffe://e.org/x', inbound: {listen: nope}}]", "services[0]"),
    ("services: [{name: x, spiffe_id: 'spiffe://E.org/x'}]", "services[0]"),
    ("services: [{name: x, spiffe_id: 'spiffe://e.org/x', colour: red}]", "unknown key"),
])
def test_bad_service_declarations_are_refused(tmp_path: Path, services: str, message: str) -> None:
    from trustmesh.cli.agent_run_cmd import _build_config

    cfg = tmp_path / "a.yaml"
    cfg.write_text(f"server: [127.0.0.1:8081]\ntrust-bundle: /x.pem\n{services}\n")
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        _build_config(build_parser().parse_args(["agent", "run", "--config", str(cfg)]))


def test_signing_workers_default_to_the_cpus_and_zero_means_a_thread() -> None:
    import os

    def build(*extra: str) -> object:
        return server_cmd._build_config(build_parser().parse_args(
            ["server", "run", "--trust-domain", "example.org", *extra]))

    assert build().signing_workers == (os.cpu_count() or 1)  # type: ignore[attr-defined]
    assert build("--signing-workers", "0").signing_workers == 0  # type: ignore[attr-defined]
    assert build("--signing-workers", "3").signing_workers == 3  # type: ignore[attr-defined]
    for bad in ("-1", "many"):
        with pytest.raises(ConfigError, match="--signing-workers"):
            build("--signing-workers", bad)


def test_a_join_token_on_the_command_line_is_warned_about(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # argv is world-readable in /proc/PID/cmdline: the flag still works, with a warning; the
    # file (and the environment variable) carry the token without one.
    base = ["agent", "run", "--server", "127.0.0.1:8081", "--trust-bundle", str(tmp_path / "b.pem")]
    config = agent_run_cmd._build_config(build_parser().parse_args([*base, "--join-token", "tmjt_secret"]))
    assert config.join_token == "tmjt_secret"
    err = capsys.readouterr().err
    assert "--join-token puts the token on the command line" in err and "--join-token-file" in err
    assert "tmjt_secret" not in err
    token_file = tmp_path / "token"
    token_file.write_text("tmjt_fromfile\n")
    config = agent_run_cmd._build_config(build_parser().parse_args([*base, "--join-token-file", str(token_file)]))
    assert config.join_token == "tmjt_fromfile"
    assert capsys.readouterr().err == ""


def test_the_attestation_listener_defaults_to_the_bind_port_plus_one() -> None:
    def build(*extra: str) -> object:
        return server_cmd._build_config(build_parser().parse_args(
            ["server", "run", "--trust-domain", "example.org", *extra]))

    assert build().attest_address == "127.0.0.1:8082"  # type: ignore[attr-defined]
    assert build("--bind", "0.0.0.0:9000").attest_address == "0.0.0.0:9001"  # type: ignore[attr-defined]
    assert build("--bind", "[::1]:0").attest_address == "[::1]:0"  # type: ignore[attr-defined]  # both any free port
    assert build("--bind", "0.0.0.0:9000", "--attest-bind", "10.0.0.1:7000").attest_address == "10.0.0.1:7000"  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="--attest-bind"):
        build("--bind", "127.0.0.1:65535")
