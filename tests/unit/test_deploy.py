"""The deploy files work, checked as far as this machine allows.

- systemd: the units pass `systemd-analyze verify` (this machine's systemd parsing them for real)
  and keep a low `systemd-analyze security` exposure; their properties (separate runtime
  directories, credentials, hardening minus what attestation needs) are read back from them.
- docker compose: no Docker engine here, so the file is parsed and its properties checked.
- Helm: the chart is rendered by Helm's own engine (helm-python-sdk: Helm v4 as a library, no
  binary, no network) with its default values and with every option on, linted, and every
  rendered document checked; the command lines it renders are loaded by the real CLI code.
- example configs: loaded by the real config loaders; attestation listens with the Node API.

Each property check is a function that returns the problems it finds, and each is also fed a
broken copy, so a check that could never fail would be caught.
"""

from __future__ import annotations

import argparse
import copy
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

from trustmesh.cli import agent_run_cmd, server_cmd
from trustmesh.cli.main import build_parser
from trustmesh.hostport import split_host_port

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SYSTEMD = DEPLOY / "systemd"
CHART = DEPLOY / "helm" / "trustmesh"
EVERYTHING = CHART / "ci" / "everything-values.yaml"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
CREDENTIALS = "/run/credentials/trustmesh-server.service"
AGENT_CAPS = {"SYS_PTRACE", "DAC_READ_SEARCH"}  # reading other users' /proc entries, nothing more


def _argv(argv: list[str]) -> argparse.Namespace:
    try:
        return build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse exits on an unknown flag or a bad value
        raise AssertionError(f"`trustmesh {' '.join(argv)}` does not parse with the real CLI") from exc


def _server_config(argv: list[str]) -> Any:
    assert argv[:2] == ["server", "run"], argv
    return server_cmd._build_config(_argv(argv))


def _agent_config(argv: list[str]) -> Any:
    assert argv[:2] == ["agent", "run"], argv
    return agent_run_cmd._build_config(_argv(argv))


def _host(address: str) -> str:
    return split_host_port(address, listening=True)[0]


def attestation_problems(config: Any, where: str) -> list[str]:
    """A server whose Node API others can reach must let them attest too: same host."""
    node, attest = _host(config.bind), _host(config.attest_address)
    if node not in LOOPBACK and attest != node:
        return [f"{where}: the Node API listens on {config.bind} but attestation on {config.attest_address}"]
    return []


def agent_attestation_problems(config: Any, where: str) -> list[str]:
    servers = [split_host_port(s)[0] for s in config.server]
    attest = [split_host_port(a)[0] for a in config.attest_addresses]
    return [] if servers == attest else [f"{where}: attests at {attest}, talks to {servers}"]


# --- systemd ---------------------------------------------------------------------------------

def _unit(path: Path) -> dict[str, list[str]]:
    """`Key=value` settings of a unit or drop-in, every value of a repeated key kept in order."""
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def _merged(unit: Path) -> dict[str, list[str]]:
    """The unit with its drop-ins applied, as systemd does (an empty value resets a list)."""
    settings = _unit(unit)
    for dropin in sorted(unit.parent.glob(f"{unit.name}.d/*.conf")):
        for key, values in _unit(dropin).items():
            for value in values:
                settings[key] = [] if value == "" else settings.get(key, []) + [value]
    return settings


def _exec_argv(settings: dict[str, list[str]]) -> list[str]:
    (line,) = settings["ExecStart"]
    argv = shlex.split(line)
    assert argv[0].endswith("/trustmesh"), line
    return argv[1:]


def _credential_names(argv: list[str], config: Path | None) -> set[str]:
    """The credentials a command line (and the config file it names) reads."""
    text = " ".join(argv) + (config.read_text() if config else "")
    return set(re.findall(r"(?:\$\{CREDENTIALS_DIRECTORY\}|%d|" + re.escape(CREDENTIALS) + r")/([\w.-]+)", text))


def systemd_problems(server: dict[str, list[str]], agent: dict[str, list[str]], server_yaml: Path,
                     agent_yaml: Path) -> list[str]:
    problems = []
    server_run, agent_run = server.get("RuntimeDirectory", []), agent.get("RuntimeDirectory", [])
    if server_run != ["trustmesh-server"] or agent_run != ["trustmesh-agent"]:
        problems.append(f"runtime directories {server_run} and {agent_run}: each unit needs its own")
    socket = yaml.safe_load(agent_yaml.read_text())["socket"]
    if agent_run and not socket.startswith(f"/run/{agent_run[0]}/"):
        problems.append(f"the agent's socket {socket} is not in its runtime directory")
    if agent.get("RuntimeDirectoryPreserve") != ["yes"]:
        problems.append("the agent's socket directory must outlive the agent (RuntimeDirectoryPreserve=yes)")
    for name, unit in (("server", server), ("agent", agent)):
        if int(unit.get("LimitNOFILE", ["0"])[-1]) < 65536:
            problems.append(f"{name}: LimitNOFILE below 65536")
        for key, want in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("PrivateTmp", "yes")):
            if unit.get(key, [""])[-1] != want:
                problems.append(f"{name}: {key}={want} missing")
    if server.get("User", ["root"])[-1] == "root" or server.get("CapabilityBoundingSet", ["x"])[-1] != "":
        problems.append("server: must run as its own user with no capabilities")
    if server.get("ProtectProc", [""])[-1] != "invisible":
        problems.append("server: ProtectProc=invisible missing")
    # The agent names its callers from /proc: nothing may hide other processes from it.
    for key in ("ProtectProc", "ProcSubset", "PrivatePIDs", "PrivateUsers"):
        if key in agent:
            problems.append(f"agent: {key}= would hide the workloads it attests")
    caps = {c.removeprefix("CAP_") for c in agent.get("CapabilityBoundingSet", ["ALL"])[-1].split()}
    if not caps <= AGENT_CAPS | {"NET_BIND_SERVICE"}:
        problems.append(f"agent: capabilities {sorted(caps)}")
    # Secrets are credentials: every path into the credentials directory has a LoadCredential=.
    argv = _exec_argv(server)
    loaded = {value.partition(":")[0] for value in server.get("LoadCredential", [])}
    used = _credential_names(argv, server_yaml)
    if used - loaded:
        problems.append(f"server: credentials read but not loaded: {sorted(used - loaded)}")
    args = _argv(argv)
    for flag in ("kek_file", "pkcs11_pin_file"):
        value = getattr(args, flag)
        if flag == "kek_file" or args.key_manager == "pkcs11":
            if not (value or "").startswith("${CREDENTIALS_DIRECTORY}/"):
                problems.append(f"server: --{flag.replace('_', '-')} {value} is not a systemd credential")
    return problems


def _systemd_tree(tmp_path: Path, with_dropins: bool = True) -> Path:
    """A copy of deploy/systemd whose ExecStart runs a stub that exists here: `verify` checks
    that the command is executable, and /usr/local/bin/trustmesh is not installed."""
    stub = tmp_path / "trustmesh"
    stub.write_text("#!/bin/sh\n")
    stub.chmod(0o755)
    tree = tmp_path / "units"
    shutil.copytree(SYSTEMD, tree, ignore=None if with_dropins else shutil.ignore_patterns("*.d"))
    for path in [*tree.glob("*.service"), *tree.glob("*.d/*.conf")]:
        path.write_text(path.read_text().replace("/usr/local/bin/trustmesh", str(stub)))
    return tree


def _systemd_analyze(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing: install Debian's systemd (the machine image has it)")
    return subprocess.run(["systemd-analyze", *args], cwd=cwd, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("with_dropins", [True, False], ids=["with-pkcs11-dropin", "plain"])
def test_units_pass_systemd_analyze_verify(tmp_path: Path, with_dropins: bool) -> None:
    tree = _systemd_tree(tmp_path, with_dropins)
    done = _systemd_analyze("verify", "--man=no", "./trustmesh-server.service", "./trustmesh-agent.service", cwd=tree)
    assert done.returncode == 0 and done.stderr == "", done.stderr


def test_systemd_analyze_verify_would_catch_a_broken_unit(tmp_path: Path) -> None:
    tree = _systemd_tree(tmp_path)
    unit = tree / "trustmesh-server.service"
    unit.write_text(unit.read_text().replace("ProtectSystem=strict", "ProtectSystm=strict"))
    done = _systemd_analyze("verify", "--man=no", "./trustmesh-server.service", cwd=tree)
    assert "Unknown key" in done.stderr and "ProtectSystm" in done.stderr


@pytest.mark.parametrize(("unit", "threshold"), [("trustmesh-server.service", 2.0),
                                                 ("trustmesh-agent.service", 3.5)])
def test_units_keep_a_low_exposure(tmp_path: Path, unit: str, threshold: float) -> None:
    # The agent scores higher by design: root with ptrace rights, and /proc visible.
    tree = _systemd_tree(tmp_path)
    done = _systemd_analyze("security", "--offline=yes", f"--threshold={threshold * 10:.0f}", f"./{unit}",
                            cwd=tree)
    score = re.search(r"Overall exposure level for \S+: ([0-9.]+)", done.stdout)
    assert done.returncode == 0 and score, done.stdout[-2000:] + done.stderr
    assert float(score.group(1)) <= threshold


def test_systemd_units_properties() -> None:
    server = _merged(SYSTEMD / "trustmesh-server.service")
    agent = _merged(SYSTEMD / "trustmesh-agent.service")
    assert systemd_problems(server, agent, SYSTEMD / "server.yaml", SYSTEMD / "agent.yaml") == []
    plain = _unit(SYSTEMD / "trustmesh-server.service")
    assert systemd_problems(plain, agent, SYSTEMD / "server.yaml", SYSTEMD / "agent.yaml") == []
    assert {"kek", "pkcs11-pin", "etcd-key"} <= {v.partition(":")[0] for v in server["LoadCredential"]}


def test_the_pkcs11_dropin_runs_a_valid_server_with_the_hsm() -> None:
    argv = _exec_argv(_merged(SYSTEMD / "trustmesh-server.service"))
    argv = [a.replace("${CREDENTIALS_DIRECTORY}", CREDENTIALS) for a in argv]
    argv = [str(SYSTEMD / "server.yaml") if a == "/etc/trustmesh/server.yaml" else a for a in argv]
    config = _server_config(argv)
    assert config.key_manager == "pkcs11" and config.pkcs11_signing_ca
    assert str(config.pkcs11_pin_file) == f"{CREDENTIALS}/pkcs11-pin"
    assert str(config.kek_file) == f"{CREDENTIALS}/kek"
    assert attestation_problems(config, "systemd") == []


@pytest.mark.parametrize(("unit", "edit", "problem"), [
    ("server", {"RuntimeDirectory": ["trustmesh"]}, "runtime directories"),
    ("agent", {"RuntimeDirectory": ["trustmesh"]}, "runtime directories"),
    ("agent", {"ProtectProc": ["invisible"]}, "would hide the workloads"),
    ("server", {"LimitNOFILE": ["1024"]}, "LimitNOFILE"),
    ("server", {"LoadCredential": []}, "credentials read but not loaded"),
    ("server", {"ExecStart": ["/usr/local/bin/trustmesh server run --config /etc/trustmesh/server.yaml "
                              "--kek-file /etc/trustmesh/kek.bin"]}, "is not a systemd credential"),
    ("agent", {"CapabilityBoundingSet": ["CAP_SYS_ADMIN"]}, "capabilities"),
])
def test_systemd_checks_catch_a_broken_unit(unit: str, edit: dict[str, list[str]], problem: str) -> None:
    units = {"server": _merged(SYSTEMD / "trustmesh-server.service"),
             "agent": _merged(SYSTEMD / "trustmesh-agent.service")}
    units[unit].update(edit)
    problems = systemd_problems(units["server"], units["agent"], SYSTEMD / "server.yaml", SYSTEMD / "agent.yaml")
    assert any(problem in p for p in problems), problems


# --- docker compose --------------------------------------------------------------------------

def _compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((DEPLOY / "compose" / "docker-compose.yml").read_text())
    return doc


def _mode(value: Any) -> int:
    """A compose file mode: YAML 1.2's 0o400 reaches PyYAML (YAML 1.1) as a string."""
    return int(value, 8) if isinstance(value, str) else int(value)


def _volume_name(mount: str | dict[str, Any]) -> tuple[str, str, bool]:
    """(source, target, read-only) of a compose volume entry."""
    if isinstance(mount, dict):
        return mount["source"], mount["target"], bool(mount.get("read_only"))
    parts = mount.split(":")
    return parts[0], parts[1], len(parts) > 2 and "ro" in parts[2].split(",")


def compose_problems(doc: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    services: dict[str, dict[str, Any]] = doc["services"]
    trustmesh = {n: s for n, s in services.items() if str(s.get("image", "")).startswith("trustmesh")}
    servers = {n: shlex.split(s["command"]) for n, s in trustmesh.items() if s["command"].startswith("server")}
    agents = {n: shlex.split(s["command"]) for n, s in trustmesh.items() if s["command"].startswith("agent")}
    if len(servers) != 3 or len(agents) != 1:
        return [f"expected 3 servers and an agent, found {sorted(servers)} and {sorted(agents)}"]
    server_volumes: dict[str, str] = {}
    for name, argv in servers.items():
        service, config = services[name], _server_config(argv)
        problems += attestation_problems(config, name)
        user = str(service.get("user", "")).split(":")[0]
        if user in ("", "0", "root"):
            problems.append(f"{name}: runs as root")
        # Key files must be the server user's own, mode 0400: a secret Compose copies in.
        by_target = {f"/run/secrets/{s['target']}": s for s in service.get("secrets", []) if isinstance(s, dict)}
        for flag in ("kek_file", "etcd_key", "pkcs11_pin_file", "upstream_ca_key"):
            path = str(getattr(config, flag) or "")
            if not path:
                continue
            secret = by_target.get(path)
            if secret is None:
                problems.append(f"{name}: --{flag.replace('_', '-')} {path} is not a compose secret")
                continue
            owner = (str(secret.get("uid")), str(secret.get("gid")), _mode(secret.get("mode", 0o444)))
            if owner != (user, user, 0o400):
                problems.append(f"{name}: secret {secret['source']} is not {user}:{user} mode 0400")
            # Outside Swarm, Compose ignores uid/gid/mode of a `file:` secret (a bind mount).
            if "environment" not in doc["secrets"][secret["source"]]:
                problems.append(f"{name}: secret {secret['source']} from a file keeps the host file's owner and mode")
        admin = str(config.admin_socket_path)
        if not any(admin.startswith(t.rstrip("/") + "/") for t in service.get("tmpfs", [])):
            problems.append(f"{name}: admin socket {admin} is not in a tmpfs of its own")
        for mount in service.get("volumes", []):
            source, target, _ = _volume_name(mount)
            server_volumes[source] = name
            if admin.startswith(target.rstrip("/") + "/"):
                problems.append(f"{name}: admin socket {admin} is in volume {source}")
        if service.get("cap_drop") != ["ALL"] or "no-new-privileges:true" not in service.get("security_opt", []):
            problems.append(f"{name}: keeps capabilities or may gain privileges")
    ((agent_name, agent_argv),) = agents.items()
    agent, agent_config = services[agent_name], _agent_config(agent_argv)
    problems += agent_attestation_problems(agent_config, agent_name)
    if agent.get("pid") != "host":
        problems.append("agent: without pid: host it cannot see the workloads that call it")
    if set(agent.get("cap_add", [])) - AGENT_CAPS or agent.get("cap_drop") != ["ALL"]:
        problems.append(f"agent: capabilities {agent.get('cap_add')}")
    for mount in agent.get("volumes", []):
        source, _, _ = _volume_name(mount)
        if source in server_volumes:
            problems.append(f"agent: mounts {source}, the data volume of {server_volumes[source]}")
    socket_dir = str(agent_config.socket_path.parent)
    if not any(_volume_name(m)[1] == socket_dir for m in agent.get("volumes", [])):
        problems.append(f"agent: its socket directory {socket_dir} is not a volume workloads can mount")
    # Whoever else mounts a server's data does so read-only and holds no trustmesh process.
    for name, service in services.items():
        if name in servers:
            continue
        for mount in service.get("volumes", []):
            source, _, read_only = _volume_name(mount)
            if source in server_volumes and (not read_only or name in trustmesh):
                problems.append(f"{name}: mounts {source}, the data volume of {server_volumes[source]}")
    for name, service in services.items():
        if name.startswith("etcd"):
            command = service["command"]
            if "--client-cert-auth" not in command or "--peer-client-cert-auth" not in command or "http://" in command:
                problems.append(f"{name}: etcd without TLS and client certificates")
    return problems


def test_compose_properties() -> None:
    doc = _compose()
    assert compose_problems(doc) == []
    # The published ports carry the node API and attestation together.
    assert {"8081:8081", "8082:8082"} <= set(doc["services"]["trustmesh-1"]["ports"])


def _break_agent_pid(doc: dict[str, Any]) -> None:
    del doc["services"]["agent"]["pid"]


def _share_server_data_with_agent(doc: dict[str, Any]) -> None:
    doc["services"]["agent"]["volumes"].append("trustmesh-1-data:/server:ro")


def _admin_socket_in_data(doc: dict[str, Any]) -> None:
    service = doc["services"]["trustmesh-2"]
    service["command"] = service["command"].replace("/run/trustmesh-server/admin.sock",
                                                    "/var/lib/trustmesh/server/admin.sock")


def _file_secret(doc: dict[str, Any]) -> None:
    doc["secrets"]["kek"] = {"file": "../../kek.bin"}


def _world_readable_secret(doc: dict[str, Any]) -> None:
    doc["services"]["trustmesh-3"]["secrets"][0]["mode"] = 0o444


def _attest_on_loopback(doc: dict[str, Any]) -> None:
    service = doc["services"]["trustmesh-1"]
    service["command"] = service["command"].replace("--attest-bind 0.0.0.0:8082", "--attest-bind 127.0.0.1:8082")


def _etcd_in_clear(doc: dict[str, Any]) -> None:
    doc["services"]["etcd2"]["command"] = doc["services"]["etcd2"]["command"].replace("--client-cert-auth", "")


@pytest.mark.parametrize(("breakage", "problem"), [
    (_break_agent_pid, "pid: host"), (_share_server_data_with_agent, "data volume"),
    (_admin_socket_in_data, "admin socket"), (_file_secret, "host file's owner"),
    (_world_readable_secret, "mode 0400"), (_attest_on_loopback, "attestation on 127.0.0.1:8082"),
    (_etcd_in_clear, "etcd without TLS"),
])
def test_compose_checks_catch_a_broken_file(breakage: Any, problem: str) -> None:
    doc = copy.deepcopy(_compose())
    breakage(doc)
    problems = compose_problems(doc)
    assert any(problem in p for p in problems), problems


# --- Helm ------------------------------------------------------------------------------------

def _render(values: dict[str, Any] | None) -> list[dict[str, Any]]:
    with helm.Chart.load(str(CHART)) as chart:
        manifests = chart.render(values, name="trustmesh", namespace="trustmesh")
    docs = []
    for path, text in sorted(manifests.items()):
        if path.endswith(".yaml"):
            docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def _everything() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load(EVERYTHING.read_text())
    return values


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {"defaults": _render(None), "everything": _render(_everything())}


def _workloads(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in docs:
        if doc["kind"] in ("Deployment", "DaemonSet", "StatefulSet"):
            yield f"{doc['kind']}/{doc['metadata']['name']}", doc["spec"]["template"]["spec"]


def _objects(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in docs}


def _containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def pod_security_problems(docs: list[dict[str, Any]], privileged_allowed: tuple[str, ...] = ()) -> list[str]:
    """securityContext on every pod and container; root, hostPID and privilege where needed only."""
    problems = []
    workloads = dict(_workloads(docs))
    if not workloads:
        return ["no pods rendered"]
    for name, pod in workloads.items():
        context = pod.get("securityContext") or {}
        if context.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problems.append(f"{name}: no RuntimeDefault seccomp profile")
        agent = name.endswith("-agent")
        if pod.get("hostPID") and not agent:
            problems.append(f"{name}: hostPID, which only the agent needs")
        if pod.get("hostNetwork") or pod.get("hostIPC"):
            problems.append(f"{name}: shares the host's network or IPC")
        if pod.get("automountServiceAccountToken") is not False:
            problems.append(f"{name}: mounts a service account token it never uses")
        if not agent and not name.endswith("-csi-driver") and context.get("runAsNonRoot") is not True:
            problems.append(f"{name}: may run as root")
        for container in _containers(pod):
            where = f"{name}/{container['name']}"
            sc = container.get("securityContext")
            if sc is None:
                problems.append(f"{where}: no securityContext")
                continue
            if sc.get("privileged") and container["name"] not in privileged_allowed:
                problems.append(f"{where}: privileged")
            if not sc.get("privileged") and sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: may escalate privileges")
            if sc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where}: writable root filesystem")
            caps = sc.get("capabilities", {})
            if [c.upper() for c in caps.get("drop", [])] != ["ALL"]:
                problems.append(f"{where}: does not drop every capability")
            added = set(caps.get("add", []))
            if added and (not agent or added - AGENT_CAPS):
                problems.append(f"{where}: adds capabilities {sorted(added)}")
            if sc.get("runAsUser") == 0 and not agent:
                problems.append(f"{where}: runs as root")
    return problems


def _server(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    pod = _objects(docs)["Deployment/trustmesh-server"]["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "server"]
    return pod, container


def _argv_of(container: dict[str, Any]) -> list[str]:
    return [a.replace("$(POD_NAME)", "trustmesh-server-0").replace("$(NODE_NAME)", "node-1")
            for a in container["args"]]


def _mounted_from(pod: dict[str, Any], container: dict[str, Any], path: str) -> dict[str, Any] | None:
    """The volume that holds `path` in `container`, or None."""
    for mount in container.get("volumeMounts", []):
        if path.startswith(mount["mountPath"].rstrip("/") + "/"):
            volume: dict[str, Any] = next(v for v in pod["volumes"] if v["name"] == mount["name"])
            return volume
    return None


def server_file_problems(docs: list[dict[str, Any]]) -> list[str]:
    """Every file the server is given is in a volume; its private keys come through the init
    container, which copies them from their Secrets into a memory volume as the server's user."""
    pod, container = _server(docs)
    config = _server_config(_argv_of(container))
    problems = attestation_problems(config, "chart")
    private = {"kek_file", "pkcs11_pin_file", "upstream_ca_key"}
    (init,) = pod.get("initContainers", [{}])
    script = " ".join(init.get("command", []))
    for flag in ("kek_file", "etcd_ca", "etcd_cert", "etcd_key", "pkcs11_pin_file", "upstream_ca_cert",
                 "upstream_ca_key", "oidc_discovery_cert", "oidc_discovery_key", "console_cert", "console_key"):
        path = str(getattr(config, flag) or "")
        if not path or path.startswith("pkcs11:"):
            continue
        volume = _mounted_from(pod, container, path)
        if volume is None:
            problems.append(f"--{flag.replace('_', '-')} {path} is in no volume")
        elif flag in private:
            if volume.get("emptyDir", {}).get("medium") != "Memory":
                problems.append(f"--{flag.replace('_', '-')} {path} is not in a memory volume")
            copied = re.search(r"install -m 0400 (\S+) " + re.escape(path) + r"\b", script)
            source = _mounted_from(pod, init, copied.group(1)) if copied else None
            if source is None or "secret" not in source:
                problems.append(f"--{flag.replace('_', '-')} {path} is not copied from a Secret")
        elif "secret" not in volume:
            problems.append(f"--{flag.replace('_', '-')} {path} is not from a Secret")
    if not config.store.startswith("etcd+https://") or not (config.etcd_ca and config.etcd_cert and config.etcd_key):
        problems.append(f"the store {config.store} is not etcd over TLS with a client certificate")
    probes = {kind: container.get(kind, {}).get("httpGet", {}).get("path")
              for kind in ("livenessProbe", "readinessProbe")}
    if probes != {"livenessProbe": "/healthz", "readinessProbe": "/readyz"}:
        problems.append(f"probes {probes}")
    return problems


def test_chart_renders_and_lints_clean_with_defaults_and_with_everything_on() -> None:
    for values in (None, _everything()):
        report = helm.lint(str(CHART), values, strict=True)
        assert report["errors"] == [], report
        assert [m for m in report["messages"] if m["severity"] >= 2] == [], report["messages"]


def test_every_pod_is_locked_down(rendered: dict[str, list[dict[str, Any]]]) -> None:
    assert pod_security_problems(rendered["defaults"]) == []
    # The CSI node plugin alone is privileged (it mounts into workload pods); nothing else.
    assert pod_security_problems(rendered["everything"], privileged_allowed=("spiffe-csi-driver",)) == []
    assert "DaemonSet/trustmesh-csi-driver" not in _objects(rendered["defaults"])
    hostpid = [name for docs in rendered.values() for name, pod in _workloads(docs) if pod.get("hostPID")]
    assert set(hostpid) == {"DaemonSet/trustmesh-agent"}


def test_the_server_runs_as_configured_from_secrets(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for docs in rendered.values():
        assert server_file_problems(docs) == []
    _, container = _server(rendered["defaults"])
    config = _server_config(_argv_of(container))
    assert config.key_manager == "software" and config.oidc_issuer is None and config.console_bind is None
    assert config.store == ("etcd+https://trustmesh-etcd-0.trustmesh-etcd:2379,trustmesh-etcd-1.trustmesh-etcd:2379,"
                            "trustmesh-etcd-2.trustmesh-etcd:2379/trustmesh")
    objects = _objects(rendered["everything"])
    assert objects["Deployment/trustmesh-server"]["spec"]["replicas"] == 5
    pod, container = _server(rendered["everything"])
    config = _server_config(_argv_of(container))
    assert (config.key_manager, config.pkcs11_token_label, config.pkcs11_signing_ca) == ("pkcs11", "bank-mesh-ca", True)
    assert str(config.pkcs11_module) == "/usr/lib/softhsm/libsofthsm2.so"
    assert _mounted_from(pod, container, "/usr/lib/softhsm/libsofthsm2.so") == {
        "name": "softhsm-lib", "hostPath": {"path": "/usr/lib/softhsm", "type": "Directory"}}
    pin = next(v for v in pod["volumes"] if v["name"] == "pkcs11-pin-in")
    assert pin["secret"]["secretName"] == "bank-hsm-pin" and pin["secret"]["items"][0]["key"] == "user-pin"
    assert config.upstream_ca_key == "pkcs11:object=bank-issuing-ca-key"
    assert config.store == ("etcd+https://etcd-a.db.bank.example:2379,etcd-b.db.bank.example:2379,"
                            "etcd-c.db.bank.example:2379/mesh")
    assert "StatefulSet/trustmesh-etcd" not in objects
    assert config.oidc_issuer == "https://oidc.mesh.bank.example" and config.console_bind == "0.0.0.0:8443"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for service, port in (("Service/trustmesh-oidc", "oidc"), ("Service/trustmesh-console", "console")):
        assert objects[service]["spec"]["ports"][0]["targetPort"] == port and port in ports
    assert split_host_port(config.oidc_discovery_bind)[1] == ports["oidc"]
    assert objects["Service/trustmesh-oidc"]["spec"]["type"] == "LoadBalancer"


def test_the_agent_offers_the_socket_through_a_host_directory(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for docs in rendered.values():
        pod = _objects(docs)["DaemonSet/trustmesh-agent"]["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        config = _agent_config(_argv_of(container))
        assert agent_attestation_problems(config, "chart") == []
        assert config.server == ("trustmesh-server-replicas.trustmesh.svc:8081",)
        socket_volume = _mounted_from(pod, container, str(config.socket_path))
        assert socket_volume is not None and socket_volume["hostPath"]["path"] == "/run/trustmesh-agent"
        assert container["securityContext"]["capabilities"]["add"] == ["SYS_PTRACE", "DAC_READ_SEARCH"]
    # The CSI driver hands the same directory to workloads, read-only, with no hostPath in theirs.
    objects = _objects(rendered["everything"])
    assert objects["CSIDriver/csi.spiffe.io"]["spec"]["volumeLifecycleModes"] == ["Ephemeral"]
    pod = objects["DaemonSet/trustmesh-csi-driver"]["spec"]["template"]["spec"]
    driver = next(c for c in pod["containers"] if c["name"] == "spiffe-csi-driver")
    assert "-workload-api-socket-dir=/trustmesh-agent-socket" in driver["args"]
    mount = next(m for m in driver["volumeMounts"] if m["mountPath"] == "/trustmesh-agent-socket")
    assert mount["readOnly"] is True
    assert next(v for v in pod["volumes"] if v["name"] == mount["name"])["hostPath"]["path"] == "/run/trustmesh-agent"


def test_the_deployed_etcd_speaks_only_tls(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = _objects(rendered["defaults"])
    etcd = objects["StatefulSet/trustmesh-etcd"]
    command = etcd["spec"]["template"]["spec"]["containers"][0]["command"]
    for flag in ("--client-cert-auth", "--peer-client-cert-auth", "--trusted-ca-file=/etc/etcd-tls/ca.pem"):
        assert flag in command
    urls = [a for a in command if "-urls=" in a and "metrics" not in a] + \
        [a for a in command if a.startswith("--initial-cluster=")]
    assert urls and all("http://" not in a and "https://" in a for a in urls), urls
    ingress = objects["NetworkPolicy/trustmesh-etcd"]["spec"]["ingress"]
    assert ingress[0]["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "server"


def _drop_security_context(docs: list[dict[str, Any]]) -> None:
    _server(docs)[1].pop("securityContext")


def _hostpid_server(docs: list[dict[str, Any]]) -> None:
    _server(docs)[0]["hostPID"] = True


def _privileged_agent(docs: list[dict[str, Any]]) -> None:
    pod = _objects(docs)["DaemonSet/trustmesh-agent"]["spec"]["template"]["spec"]
    pod["containers"][0]["securityContext"]["privileged"] = True


def _agent_admin_caps(docs: list[dict[str, Any]]) -> None:
    pod = _objects(docs)["DaemonSet/trustmesh-agent"]["spec"]["template"]["spec"]
    pod["containers"][0]["securityContext"]["capabilities"]["add"].append("SYS_ADMIN")


def _no_seccomp(docs: list[dict[str, Any]]) -> None:
    _objects(docs)["StatefulSet/trustmesh-etcd"]["spec"]["template"]["spec"]["securityContext"].pop("seccompProfile")


@pytest.mark.parametrize(("breakage", "problem"), [
    (_drop_security_context, "no securityContext"), (_hostpid_server, "hostPID"),
    (_privileged_agent, "privileged"), (_agent_admin_caps, "adds capabilities"), (_no_seccomp, "seccomp"),
])
def test_pod_checks_catch_a_broken_rendering(rendered: dict[str, list[dict[str, Any]]], breakage: Any,
                                             problem: str) -> None:
    docs = copy.deepcopy(rendered["defaults"])
    breakage(docs)
    assert any(problem in p for p in pod_security_problems(docs)), pod_security_problems(docs)


def _kek_straight_from_secret(docs: list[dict[str, Any]]) -> None:
    pod, container = _server(docs)
    container["args"] = [a.replace("--kek-file=/run/trustmesh-secrets/kek", "--kek-file=/etc/kek/kek")
                         for a in container["args"]]
    container["volumeMounts"].append({"name": "kek-in", "mountPath": "/etc/kek"})


def _plain_etcd(docs: list[dict[str, Any]]) -> None:
    container = _server(docs)[1]
    container["args"] = [a.replace("etcd+https://", "etcd://") for a in container["args"]
                         if not a.startswith(("--etcd-ca", "--etcd-cert", "--etcd-key"))]


def _probe_on_metrics(docs: list[dict[str, Any]]) -> None:
    _server(docs)[1]["readinessProbe"]["httpGet"]["path"] = "/metrics"


@pytest.mark.parametrize(("breakage", "problem"), [
    (_kek_straight_from_secret, "not in a memory volume"), (_plain_etcd, "not etcd over TLS"),
    (_probe_on_metrics, "probes"),
])
def test_server_checks_catch_a_broken_rendering(rendered: dict[str, list[dict[str, Any]]], breakage: Any,
                                                problem: str) -> None:
    docs = copy.deepcopy(rendered["defaults"])
    breakage(docs)
    assert any(problem in p for p in server_file_problems(docs)), server_file_problems(docs)


@pytest.mark.parametrize(("values", "message"), [
    ({"server": {"upstreamCA": {"enabled": True, "keyInToken": "k"}}}, "set server.hsm.enabled=true"),
    ({"etcd": {"deploy": False}}, "etcd.endpoints: list the external etcd members"),
    ({"server": {"oidc": {"enabled": True, "issuer": "http://oidc.example.org"}}}, "must be an https:// URL"),
])
def test_the_chart_refuses_values_that_cannot_work(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmError, match=re.escape(message)):
        _render(values)


def test_the_kustomize_manifests_keep_up_with_the_chart() -> None:
    docs = [d for p in sorted((DEPLOY / "kubernetes").glob("*.yaml")) for d in yaml.safe_load_all(p.read_text())
            if d and d["kind"] != "Kustomization"]
    assert pod_security_problems(docs) == []
    agent = _objects(docs)["DaemonSet/trustmesh-agent"]["spec"]["template"]["spec"]
    config = _agent_config(_argv_of(agent["containers"][0]))
    volume = _mounted_from(agent, agent["containers"][0], str(config.socket_path))
    assert volume is not None and volume["hostPath"]["path"] == "/run/trustmesh-agent"
    server = _objects(docs)["Deployment/trustmesh-server"]["spec"]["template"]["spec"]["containers"][0]
    assert attestation_problems(_server_config(_argv_of(server)), "kubernetes") == []
    assert server["readinessProbe"]["httpGet"]["path"] == "/readyz"


# --- example configs -------------------------------------------------------------------------

def _with_examples_on(path: Path, tmp_path: Path) -> Path:
    """The config with every commented-out `#   key: value` line taken in (replacing the active
    key of the same name), as an operator would: the commented examples must load too."""
    lines = path.read_text().splitlines()
    optional = [line[4:] for line in lines if re.match(r"^#   [a-z0-9-]+:", line)]
    keys = {line.split(":")[0] for line in optional}
    active = [line for line in lines if not line.startswith("#") and line.split(":")[0] not in keys]
    out = tmp_path / f"all-{path.name}"
    out.write_text("\n".join(active + optional) + "\n")
    return out


def test_example_configs_load_and_attest_beside_the_node_api(tmp_path: Path) -> None:
    servers = [DEPLOY / "server.example.yaml", SYSTEMD / "server.yaml"]
    servers += [_with_examples_on(p, tmp_path) for p in servers]
    for path in servers:
        config = _server_config(["server", "run", "--config", str(path)])
        assert _host(config.bind) not in LOOPBACK, path
        assert attestation_problems(config, str(path)) == []
    on = _server_config(["server", "run", "--config", str(_with_examples_on(DEPLOY / "server.example.yaml", tmp_path))])
    assert (on.key_manager, on.oidc_issuer, on.console_bind) == ("pkcs11", "https://oidc.example.org", "0.0.0.0:8443")
    for path in (DEPLOY / "agent.example.yaml", SYSTEMD / "agent.yaml"):
        config = _agent_config(["agent", "run", "--config", str(path)])
        assert agent_attestation_problems(config, str(path)) == []
        assert str(config.socket_path).startswith("/run/trustmesh-agent/"), path


def test_an_example_attesting_on_loopback_would_be_caught(tmp_path: Path) -> None:
    config_file = tmp_path / "server.yaml"
    config_file.write_text("trust-domain: example.org\nbind: 0.0.0.0:8081\nattest-bind: 127.0.0.1:8082\n")
    config = _server_config(["server", "run", "--config", str(config_file)])
    assert attestation_problems(config, "x") == ["x: the Node API listens on 0.0.0.0:8081 but attestation on "
                                                 "127.0.0.1:8082"]
    agent_file = tmp_path / "agent.yaml"
    agent_file.write_text("server: [cp-1:8081]\nattest-server: [127.0.0.1:8082]\ntrust-bundle: b.pem\n")
    assert agent_attestation_problems(_agent_config(["agent", "run", "--config", str(agent_file)]), "y")
