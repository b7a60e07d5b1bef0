"""Each server and agent option is declared once, on its config dataclass, and the rest follows.

Walks every field of ServerConfig and AgentConfig: each is an option with exactly one flag in the
real `trustmesh … run` parser and exactly one config-file key, or is declared as deliberately
not an option; the parser accepts each flag, the loader each key, and an unknown key is refused
with one line that names it and the valid keys.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from trustmesh.agent.config import AgentConfig
from trustmesh.cli.config import ConfigError, build, resolve
from trustmesh.cli.main import build_parser
from trustmesh.controlplane.config import ServerConfig
from trustmesh.options import SWITCH, Option, declared, flag_name, is_internal, key_name

# command, config class, the options every run needs, the fields that are deliberately not options
COMMANDS: list[tuple[tuple[str, str], type[Any], dict[str, Any], set[str]]] = [
    (("server", "run"), ServerConfig, {"trust_domain": "example.org"}, {"leader_ttl"}),
    (("agent", "run"), AgentConfig, {"server": ["127.0.0.1:8081"], "trust_bundle": "/b.pem"}, {"rotation"}),
]
IDS = ["server", "agent"]

SERVICES = [{"name": "ledger", "spiffe_id": "spiffe://example.org/ledger",
             "inbound": {"listen": "0.0.0.0:9443", "forward": "127.0.0.1:8080"}}]


def _sample(decl: Option) -> Any:
    """A valid value for an option, as a user would write it."""
    if decl.parser is SWITCH:
        return True
    if decl.parser.choices:
        return decl.parser.choices[-1]
    return {"HOST:PORT": "10.1.2.3:4567", "DURATION": "90s", "PATH": "/etc/trustmesh/x.pem",
            "TEXT": "some-text", "URL": "https://hooks.example/alerts", "N": "3", "TRUST_DOMAIN": "example.org",
            "LIST": SERVICES, "KEY=SOURCE": "zone=subject:OU"}[decl.parser.metavar]


# Options that only make sense with certain values (an etcd URL; a retention of whole hours).
CONSISTENT = {"store": "etcd+https://10.1.2.3:2379", "flow_retention": "2h", "oidc_issuer": "https://oidc.example.org"}


def _run_parser(command: tuple[str, str]) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = build_parser()
    for word in command:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[word]
    return parser


def _parse(command: tuple[str, str], argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args([*command, *argv])


def _yaml_value(value: Any) -> str:
    import json

    return json.dumps(value)  # JSON is YAML


def _write(tmp_path: Path, values: dict[str, Any]) -> str:
    path = tmp_path / "config.yaml"
    path.write_text("".join(f"{key}: {_yaml_value(v)}\n" for key, v in values.items()))
    return str(path)


def _required_argv(required: dict[str, Any]) -> list[str]:
    argv = []
    for name, value in required.items():
        for item in value if isinstance(value, list) else [value]:
            argv += [flag_name(name), item]
    return argv


@pytest.mark.parametrize(("command", "cls", "required", "not_options"), COMMANDS, ids=IDS)
def test_every_field_has_exactly_one_flag_and_one_key(command: tuple[str, str], cls: type[Any],
                                                      required: dict[str, Any], not_options: set[str]) -> None:
    options = dict(declared(cls))
    names = {f.name for f in dataclasses.fields(cls)}
    assert {f.name for f in dataclasses.fields(cls) if is_internal(f)} == not_options, \
        "a field that is not an option says so in its declaration, and the list is short"
    assert {f.name for f in options} == names - not_options, "every other field is an option"
    actions = [a for a in _run_parser(command)._actions if a.option_strings]
    for f, decl in options.items():
        flags = [s for a in actions if a.dest == f.name for s in a.option_strings]
        if decl.flag:
            assert flags == [flag_name(f.name)], f"{f.name}: one flag, named after the field"
        else:
            assert flags == [], f"{f.name} is declared config-file only"
    keys = [key_name(f.name) for f in options]
    assert len(keys) == len(set(keys)) == len(options), "one config-file key per option"
    # No flag escapes the declaration: besides --help and --config, every flag is a field.
    assert {a.dest for a in actions} - {"help", "config"} == {f.name for f, d in options.items() if d.flag}


@pytest.mark.parametrize(("command", "cls", "required", "not_options"), COMMANDS, ids=IDS)
def test_the_parser_accepts_each_flag(command: tuple[str, str], cls: type[Any], required: dict[str, Any],
                                      not_options: set[str]) -> None:
    for f, decl in declared(cls):
        if not decl.flag:
            continue
        sample = _sample(decl)
        given = [flag_name(f.name)] if decl.parser is SWITCH else [flag_name(f.name), sample]  # a bare flag
        args = _parse(command, [*_required_argv(required), *given])
        values = resolve(cls, args, None)
        expected = decl.parser.read(sample)
        assert values[f.name] == ((*values[f.name][:-1], expected) if decl.repeat else expected), f.name


@pytest.mark.parametrize(("command", "cls", "required", "not_options"), COMMANDS, ids=IDS)
def test_a_file_setting_every_option_fills_every_field(tmp_path: Path, command: tuple[str, str], cls: type[Any],
                                                      required: dict[str, Any], not_options: set[str]) -> None:
    options = list(declared(cls))
    # Options that only go together with a certain value of another (etcd flags with an etcd store).
    samples = {f.name: CONSISTENT.get(f.name, _sample(decl)) for f, decl in options}
    path = _write(tmp_path, {key_name(f.name): samples[f.name] for f, _ in options})
    config = build(cls, resolve(cls, _parse(command, ["--config", path]), path))
    for f, decl in options:
        value = decl.parser.read(samples[f.name])
        assert getattr(config, f.name) == ((value,) if decl.repeat else value), f.name


@pytest.mark.parametrize(("command", "cls", "required", "not_options"), COMMANDS, ids=IDS)
@pytest.mark.parametrize("separator", ["-", "_"])
def test_the_loader_accepts_each_key(tmp_path: Path, command: tuple[str, str], cls: type[Any],
                                     required: dict[str, Any], not_options: set[str], separator: str) -> None:
    for f, decl in declared(cls):
        sample = _sample(decl)
        key = key_name(f.name).replace("-", separator)
        path = _write(tmp_path, {**{key_name(k): v for k, v in required.items() if k != f.name}, key: sample})
        values = resolve(cls, _parse(command, ["--config", path]), path)
        expected = tuple(decl.parser.read(s) for s in [sample]) if decl.repeat else decl.parser.read(sample)
        assert values[f.name] == expected, f"{key} in a config file fills {f.name}"


@pytest.mark.parametrize(("command", "cls", "required", "not_options"), COMMANDS, ids=IDS)
def test_an_unknown_key_is_one_line_naming_it_and_the_valid_ones(
        tmp_path: Path, command: tuple[str, str], cls: type[Any], required: dict[str, Any],
        not_options: set[str]) -> None:
    path = _write(tmp_path, {**{key_name(k): v for k, v in required.items()}, "data_dri": "/x", "colour": "red"})
    with pytest.raises(ConfigError) as info:
        resolve(cls, _parse(command, ["--config", path]), path)
    message = str(info.value)
    assert "\n" not in message
    assert "unknown option(s) colour, data_dri (did you mean data-dir?)" in message
    for f, _ in declared(cls):
        assert key_name(f.name) in message.split("known options:")[1]
    for name in not_options:
        assert key_name(name) not in message.split("known options:")[1]


def test_an_internal_field_is_not_a_config_key(tmp_path: Path) -> None:
    path = _write(tmp_path, {"trust-domain": "example.org", "leader-ttl": 1})
    with pytest.raises(ConfigError, match="unknown option.s. leader-ttl"):
        resolve(ServerConfig, _parse(("server", "run"), ["--config", path]), path)


def test_a_key_given_twice_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, {"trust-domain": "example.org", "data-dir": "/a", "data_dir": "/b"})
    with pytest.raises(ConfigError, match="data-dir is given twice .as data-dir and data_dir."):
        resolve(ServerConfig, _parse(("server", "run"), ["--config", path]), path)


def test_flag_over_file_over_default_on_the_real_server_config(tmp_path: Path) -> None:
    path = _write(tmp_path, {"trust-domain": "example.org", "ca_ttl": "2h", "prune-agents-after": 600})
    config = build(ServerConfig, resolve(ServerConfig, _parse(("server", "run"), [
        "--config", path, "--ca-ttl", "3h"]), path))
    assert config.ca_ttl == timedelta(hours=3)
    assert config.prune_agents_after == timedelta(minutes=10)
    assert config.root_ttl == timedelta(days=365) and config.store == "sqlite"


@pytest.mark.parametrize(("text", "message"), [
    ("ca-ttl: soon", "ca-ttl: invalid duration 'soon'"),
    ("ca-ttl: [1h]", "ca-ttl: invalid duration"),
    ("bind: nowhere", "bind: invalid address 'nowhere'"),
    ("metrics: {a: 1}", "metrics: expected one value"),
    ("trust-domain: Example.ORG", "trust-domain: invalid trust domain 'Example.ORG'"),
    ("bundle-endpoint-profile: https_other", "bundle-endpoint-profile: 'https_other': use https_spiffe or"),
])
def test_bad_file_values_name_the_file_and_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("trust-domain: example.org\n" * ("trust-domain" not in text) + text + "\n")
    with pytest.raises(ConfigError, match=f"^config file {path}: " + message.replace("[", r"\[")):
        resolve(ServerConfig, _parse(("server", "run"), ["--config", str(path)]), str(path))


def test_bad_flag_values_name_the_flag() -> None:
    with pytest.raises(ConfigError, match="^--ca-ttl: invalid duration 'soon'"):
        resolve(ServerConfig, _parse(("server", "run"), ["--trust-domain", "example.org", "--ca-ttl", "soon"]), None)
    with pytest.raises(ConfigError, match="^--server: invalid address 'nowhere'"):
        resolve(AgentConfig, _parse(("agent", "run"), ["--server", "h:1", "--server", "nowhere"]), None)


def test_off_and_null_in_a_file_mean_not_given(tmp_path: Path) -> None:
    path = _write(tmp_path, {"trust-domain": "example.org", "metrics": False, "admin-bind": None, "ca-ttl": None})
    config = build(ServerConfig, resolve(ServerConfig, _parse(("server", "run"), ["--config", path]), path))
    assert config.metrics is None and config.admin_bind is None and config.ca_ttl == timedelta(hours=24)


def test_required_options_and_cross_checks(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--trust-domain is required"):
        build(ServerConfig, resolve(ServerConfig, _parse(("server", "run"), []), None))
    with pytest.raises(ConfigError, match="--server HOST:PORT is required"):
        build(AgentConfig, resolve(AgentConfig, _parse(("agent", "run"), ["--trust-bundle", "/b"]), None))
    with pytest.raises(ConfigError, match="--trust-bundle FILE is required"):
        build(AgentConfig, resolve(AgentConfig, _parse(("agent", "run"), ["--server", "h:1"]), None))
    with pytest.raises(ConfigError, match="--x509pop-cert and --x509pop-key go together"):
        build(AgentConfig, resolve(AgentConfig, _parse(("agent", "run"), [
            "--server", "h:1", "--trust-bundle", "/b", "--x509pop-cert", "/c"]), None))
    with pytest.raises(ConfigError, match="https_web needs --bundle-endpoint-cert"):
        build(ServerConfig, resolve(ServerConfig, _parse(("server", "run"), [
            "--trust-domain", "example.org", "--bundle-endpoint", "h:1", "--bundle-endpoint-profile", "https_web"]),
            None))


@pytest.mark.parametrize(("command", "cls", "required", "not_options"), COMMANDS, ids=IDS)
def test_help_is_complete(command: tuple[str, str], cls: type[Any], required: dict[str, Any],
                          not_options: set[str]) -> None:
    parser = _run_parser(command)
    assert parser.description and parser.epilog and "examples:" in parser.epilog
    for action in parser._actions:
        assert action.help, f"{action.option_strings} has help"
    text = parser.format_help()
    for f, decl in declared(cls):
        if decl.flag:
            assert flag_name(f.name) in text
        else:
            assert key_name(f.name) in text, "a config-file-only key is named under --config"
    if cls is ServerConfig:
        assert "(default 1d)" in text and "(default ./.trustmesh/server)" in text, "defaults come from the fields"
        assert "--trust-domain TRUST_DOMAIN" in text and "(required)" in text


@pytest.mark.parametrize(("values", "message"), [
    ({"key_manager": "pkcs11"}, "needs --pkcs11-module, --pkcs11-token-label, --pkcs11-pin-file"),
    ({"pkcs11_module": Path("/m.so")}, "PKCS#11 options, but the key manager is software"),
    ({"pkcs11_signing_ca": True}, "add --key-manager pkcs11"),
    ({"upstream_ca_cert": Path("/c.pem")}, "go together"),
    ({"upstream_ca_cert": Path("/c.pem"), "upstream_ca_key": "pkcs11:object=bank"}, "an upstream key in a token needs"),
    ({"oidc_discovery_bind": "127.0.0.1:0"}, "needs --oidc-issuer"),
    ({"oidc_issuer": "http://oidc.example.org"}, "https://"),
    ({"oidc_issuer": "https://oidc.example.org/"}, "trailing"),
    ({"oidc_issuer": "https://oidc.example.org/?a=b"}, "no query"),
    ({"oidc_discovery_cert": Path("/c.pem"), "oidc_issuer": "https://o.example"}, "go together"),
])
def test_key_upstream_and_oidc_options_are_checked_together(values: dict[str, Any], message: str) -> None:
    from trustmesh.spiffeid import TrustDomain

    with pytest.raises(ConfigError, match=re.escape(message)):
        ServerConfig(trust_domain=TrustDomain("example.org"), **values)
