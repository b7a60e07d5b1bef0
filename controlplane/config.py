"""The server's configuration, as one frozen value built by the CLI.

Each field that an operator sets is declared here once, with its flag, config-file key, default,
parser and help (see ``trustmesh.options``); ``trustmesh server run`` derives its flags and its
config-file loader from these declarations.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

from trustmesh.controlplane.store.etcd import SCHEMES as ETCD_SCHEMES
from trustmesh.controlplane.store.etcd import EtcdSecurity
from trustmesh.hostport import join_host_port, split_host_port
from trustmesh.labels import CertLabel, LabelError, parse_cert_label
from trustmesh.options import (
    COUNT,
    DURATION,
    LISTEN_ADDRESS,
    PATH,
    SWITCH,
    TEXT,
    TRUST_DOMAIN,
    ConfigError,
    Parser,
    internal,
    one_of,
    option,
)
from trustmesh.spiffeid import TrustDomain


def webhook_problem(url: str) -> str | None:
    """Why `url` is not a webhook alerts may be posted to, or None. Alerts name identities
    and what they did: they travel over TLS unless they stay on this machine."""
    parsed = urlsplit(url)
    if parsed.scheme not in ("https", "http") or not parsed.hostname:
        return "give an https:// URL"
    if parsed.scheme == "http" and parsed.hostname not in ("localhost", "127.0.0.1", "::1"):
        return "alerts leave this machine only over https"
    return None


def _webhook(value: object) -> str:
    url = str(value).strip()
    if problem := webhook_problem(url):
        raise ValueError(f"{url[:100]!r}: {problem}")
    return url


WEBHOOK_URL = Parser("URL", _webhook)


def _cert_label(value: object) -> CertLabel:
    try:
        return parse_cert_label(str(value).strip())
    except LabelError as err:
        raise ValueError(str(err)) from err


CERT_LABEL = Parser("KEY=SOURCE", _cert_label)


def oidc_issuer_problem(url: str) -> str | None:
    """Why `url` cannot be an OIDC issuer, or None (OpenID Connect Discovery 1.0, section 3: an
    https URL with no query or fragment; relying parties compare it to `iss` byte for byte)."""
    parsed = urlsplit(url)
    if parsed.scheme != "https" or not parsed.hostname:
        return "an issuer is an https:// URL (relying parties fetch discovery from it)"
    if parsed.query or parsed.fragment or "?" in url or "#" in url:
        return "an issuer has no query or fragment"
    if parsed.username or parsed.password:
        return "an issuer carries no user name or password"
    if url.endswith("/"):
        return "leave out the trailing '/': relying parties compare the issuer to `iss` exactly"
    return None

# Bounds an entry's TTLs must fall within; outside them is INVALID_ARGUMENT.
MIN_X509_TTL = timedelta(seconds=1)
MAX_X509_TTL = timedelta(days=30)
MIN_JWT_TTL = timedelta(seconds=1)
MAX_JWT_TTL = timedelta(days=1)

FEDERATION = "federation (serving this trust domain's bundle to partners)"
OPERATORS = "operators (people: enrollment, login with password and TOTP, roles)"
DETECTION = "continuous verification (baselines, detectors, responses, quarantine)"
ETCD = "etcd store (TLS and authentication; every call, leases and watches included)"
CONSOLE = "web console (HTTPS; operators log in with password and TOTP, and act through the admin API)"
KEYS = "CA keys (where the root, JWT and signing keys live; the bank's own CA above the mesh)"
OIDC = "OIDC discovery (JWT-SVIDs accepted by cloud IAM, Vault and any OIDC relying party)"
MAX_CONSOLE_SESSION = timedelta(hours=12)  # the longest operator certificate the server signs


@dataclass(frozen=True)
class ServerConfig:
    trust_domain: TrustDomain = option(
        "the trust domain, e.g. example.org", TRUST_DOMAIN,
        required="--trust-domain is required (e.g. --trust-domain example.org)")
    data_dir: Path = option("state directory", PATH, default=Path(".trustmesh/server"))
    bind: str = option("agent-facing gRPC address", LISTEN_ADDRESS, default="127.0.0.1:8081")
    attest_bind: str | None = option(
        "address where new agents attest (TLS without a client certificate; serves only attestation); "
        "every other agent call goes to --bind with mTLS (default: --bind's host, its port + 1, "
        "where agents look by default)", LISTEN_ADDRESS, default=None)
    admin_bind: str | None = option(
        "also serve the admin API on this host:port over mTLS, for remote administrators whose SVIDs are "
        "registration entries marked --admin (default off)", LISTEN_ADDRESS, default=None)
    admin_socket: Path | None = option("admin API unix socket (default <data-dir>/admin.sock)", PATH, default=None)
    store: str = option(
        "'sqlite' (embedded, in the data dir), 'sqlite:///path/file.db' or 'etcd://host:port[,host:port…][/prefix]' "
        "(TLS when --etcd-ca/--etcd-cert are given; 'etcd+https://' always TLS)",
        TEXT, default="sqlite", metavar="URL")
    etcd_ca: Path | None = option(
        "PEM CA certificate(s) that etcd's server certificate must chain to; turns on TLS to etcd "
        "(etcd+https:// without it uses the system CA file)", PATH, default=None, group=ETCD)
    etcd_cert: Path | None = option(
        "PEM client certificate trustmesh presents to etcd (for etcd's --client-cert-auth); with --etcd-key",
        PATH, default=None, group=ETCD)
    etcd_key: Path | None = option("its private key (PEM; not readable by other users)", PATH, default=None,
                                   group=ETCD)
    etcd_user: str | None = option(
        "etcd user to sign in as (etcd auth enabled); its role needs readwrite on the store url's prefix; "
        "needs TLS", TEXT, default=None, metavar="NAME", group=ETCD)
    etcd_password_file: Path | None = option(
        "file holding that user's password (one line; not readable by other users)", PATH, default=None,
        group=ETCD)
    kek_file: Path | None = option(
        "file holding the 32-byte key-encryption key (raw, hex or base64; mode 0600). "
        "Default: $TRUSTMESH_KEK, else <data-dir>/kek.bin generated on first start (sqlite only)",
        PATH, default=None)
    default_x509_ttl: timedelta = option("X.509-SVID lifetime when an entry sets none", DURATION,
                                         default=timedelta(hours=1))
    default_jwt_ttl: timedelta = option("JWT-SVID lifetime when an entry sets none", DURATION,
                                        default=timedelta(minutes=5))
    ca_ttl: timedelta = option("lifetime of this replica's signing CA", DURATION, default=timedelta(hours=24))
    root_ttl: timedelta = option("lifetime of a new root CA", DURATION, default=timedelta(days=365))
    agent_ttl: timedelta = option("lifetime of agent SVIDs; agents renew at half-life", DURATION,
                                  default=timedelta(hours=1))
    x509pop_ca: Path | None = option(
        "PEM file of CA certificates that node certificates chain to, enabling x509pop node attestation",
        PATH, default=None)
    x509pop_label: tuple[CertLabel, ...] = option(
        "a node label taken from the x509pop node certificate at each attestation: KEY=subject:ATTR (ATTR: CN, "
        "O, OU, L, ST, C, serialNumber) or KEY=san-uri-prefix:PREFIX (what follows PREFIX in a SAN URI), e.g. "
        "zone=subject:OU; repeatable. The certificate owns these keys: absent there, the label is removed",
        CERT_LABEL, default=(), repeat=True)
    metrics: str | None = option("host:port to serve Prometheus metrics on (default off)", LISTEN_ADDRESS, default=None)
    replica_id: str = option(
        "this replica's name in the CA journal, logs and leader election; unique per running process "
        "(default <hostname>-<pid>)", TEXT, metavar="NAME",
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    prune_agents_after: timedelta = option(
        "the leader replica forgets agents whose SVID expired this long ago (they must attest again anyway); "
        "banned agents are kept", DURATION, default=timedelta(days=1))
    bundle_endpoint: str | None = option(
        "serve the SPIFFE bundle over HTTPS here, for federated partners (default off)", LISTEN_ADDRESS,
        default=None, group=FEDERATION)
    bundle_endpoint_profile: str = option(
        "https_spiffe: TLS with the server's SVID, spiffe://<td>/trustmesh/server; "
        "https_web: TLS with the web-PKI certificate given below", one_of("https_spiffe", "https_web"),
        default="https_spiffe", group=FEDERATION)
    bundle_endpoint_cert: Path | None = option("https_web: the certificate chain (PEM)", PATH, default=None,
                                               group=FEDERATION)
    bundle_endpoint_key: Path | None = option("https_web: its private key (PEM)", PATH, default=None,
                                              group=FEDERATION)
    bundle_refresh_hint: timedelta = option(
        "how often partners should fetch the bundle (spiffe_refresh_hint)", DURATION,
        default=timedelta(minutes=5), group=FEDERATION)
    flow_rollup_interval: timedelta = option(
        "how often each replica writes the flows agents reported, summed per edge and hour, to the store "
        "(a restart loses at most this much)", DURATION, default=timedelta(minutes=1))
    flow_retention: timedelta = option(
        "how long flow rollups are kept (`trustmesh flows`, `graph`, `policy suggest`); the leader deletes "
        "older hours", DURATION, default=timedelta(days=30))
    flow_audit_interval: timedelta = option(
        "agents' flow reports (denials, refusals) become at most one flows.reported audit event per agent "
        "per this interval; the first after a quiet interval is written at once", DURATION,
        default=timedelta(minutes=1))
    audit_anchor: str | None = option(
        "where checkpoints of the audit chain are written, outside the store, so that cutting or wiping the "
        "log is detected: a file (best on another machine or an append-only mount), 'syslog' (not read back "
        "by `audit verify`), or 'off' (default <data-dir>/audit-anchor.jsonl)", TEXT, default=None,
        metavar="FILE|syslog|off")
    audit_anchor_every: int = option(
        "write an audit checkpoint after this many events (and at most --audit-anchor-interval after the last)",
        COUNT, default=100)
    audit_anchor_interval: timedelta = option(
        "longest time an audit event stays unanchored", DURATION, default=timedelta(minutes=1))
    attest_per_minute: int = option(
        "attestation attempts each source address may make per minute, after a burst of --attest-burst; "
        "more are refused with RESOURCE_EXHAUSTED (agents retry with backoff); 0: no limit", COUNT, default=60)
    attest_burst: int = option("attestation attempts a source address may make at once (see --attest-per-minute)",
                               COUNT, default=20)
    attest_audit_interval: timedelta = option(
        "failed attestations become at most one node.attest audit event per source address per this "
        "interval; the first after a quiet interval is written at once", DURATION,
        default=timedelta(minutes=1))
    login_bind: str | None = option(
        "where operators enroll and log in (TLS without a client certificate; serves only that); "
        "only with --admin-bind (default: --admin-bind's host, its port + 1, where `trustmesh login` looks)",
        LISTEN_ADDRESS, default=None, group=OPERATORS)
    operator_cert_ttl: timedelta = option(
        "lifetime of an operator certificate from `trustmesh login` (at most 12h)", DURATION,
        default=timedelta(hours=8), group=OPERATORS)
    login_max_failures: int = option(
        "failed logins (any factor) within --login-failure-window that lock an operator", COUNT, default=5,
        group=OPERATORS)
    login_failure_window: timedelta = option("see --login-max-failures", DURATION, default=timedelta(minutes=15),
                                             group=OPERATORS)
    login_lockout: timedelta = option("how long a locked operator cannot log in", DURATION,
                                      default=timedelta(minutes=15), group=OPERATORS)
    login_per_minute: int = option(
        "enrollment and login attempts each source address may make per minute, after a burst of "
        "--login-burst; more are refused with RESOURCE_EXHAUSTED before any factor is checked; 0: no limit",
        COUNT, default=10, group=OPERATORS)
    login_burst: int = option("enrollment and login attempts a source address may make at once",
                              COUNT, default=20, group=OPERATORS)
    access_approvers: int = option(
        "people (other than the requester) who must approve a just-in-time access request", COUNT, default=1,
        group=OPERATORS)
    access_approval_window: timedelta = option(
        "a just-in-time access request not approved within this expires", DURATION, default=timedelta(hours=1),
        group=OPERATORS)
    access_max_grant: timedelta = option(
        "the longest just-in-time grant (`access request --for`, `access break-glass --for`)", DURATION,
        default=timedelta(hours=8), group=OPERATORS)
    console_bind: str | None = option(
        "serve the web console over HTTPS on this host:port (default off). Needs --admin-bind and the login "
        "listener beside it (--login-bind): the console logs operators in there and makes every call as them "
        "through the admin listener, so roles, step-up codes and the audit log apply as for the CLI",
        LISTEN_ADDRESS, default=None, group=CONSOLE)
    console_cert: Path | None = option(
        "the console's certificate chain (PEM), e.g. one for a name browsers trust; with --console-key "
        "(default: the server's own SVID, for trustmesh-server.<td> and localhost, rotated in place)",
        PATH, default=None, group=CONSOLE)
    console_key: Path | None = option("its private key (PEM; not readable by other users)", PATH, default=None,
                                      group=CONSOLE)
    console_session_ttl: timedelta = option(
        "how long a console login lasts: the lifetime of the operator certificate the console asks for at "
        "login (at most 12h); the session ends with it", DURATION, default=timedelta(hours=8), group=CONSOLE)
    key_manager: str = option(
        "software: the root and JWT keys are sealed under the KEK in the store; pkcs11: they are generated "
        "in an HSM token (sensitive, never extractable) and used only through PKCS#11 signing calls",
        one_of("software", "pkcs11"), default="software", group=KEYS)
    pkcs11_module: Path | None = option(
        "the HSM's PKCS#11 library, e.g. /usr/lib/softhsm/libsofthsm2.so (with --key-manager pkcs11)",
        PATH, default=None, group=KEYS)
    pkcs11_token_label: str | None = option("the label of the token that holds the CA keys", TEXT, default=None,
                                            metavar="LABEL", group=KEYS)
    pkcs11_pin_file: Path | None = option(
        "file holding the token's user PIN (one line; not readable by other users; a systemd credential or "
        "a Kubernetes secret works)", PATH, default=None, group=KEYS)
    pkcs11_signing_ca: bool = option(
        "keep each replica's signing CA key in the token too (made there at every rotation, never stored); "
        "every X.509-SVID is then signed by the HSM, in this process", SWITCH, default=False, group=KEYS)
    upstream_ca_cert: Path | None = option(
        "PEM chain of the bank's CA that signs the mesh's root: the issuing CA first, then each issuer up to "
        "and including the self-signed root, which becomes the trust bundle's X.509 authority",
        PATH, default=None, group=KEYS)
    upstream_ca_key: str | None = option(
        "the issuing CA's private key: a PEM file (not readable by other users), or an object in the "
        "--pkcs11-token-label token as a PKCS#11 URI, pkcs11:object=LABEL (or pkcs11:id=%%01)",
        TEXT, default=None, metavar="FILE|pkcs11:object=LABEL", group=KEYS)
    oidc_discovery_bind: str | None = option(
        "serve OIDC discovery (/.well-known/openid-configuration and its JWKS) over HTTPS here (default off); "
        "needs --oidc-issuer", LISTEN_ADDRESS, default=None, group=OIDC)
    oidc_issuer: str | None = option(
        "the issuer URL relying parties are configured with (https://host[:port][/path]); JWT-SVIDs carry it as "
        "`iss` and discovery names it. Set it and every JWT-SVID carries `iss`, with or without the listener",
        TEXT, default=None, metavar="URL", group=OIDC)
    oidc_discovery_cert: Path | None = option(
        "the discovery endpoint's certificate chain (PEM), e.g. one for the issuer's host from a CA relying "
        "parties trust; with --oidc-discovery-key (default: the server's own SVID, for trustmesh-server.<td> "
        "and localhost)", PATH, default=None, group=OIDC)
    oidc_discovery_key: Path | None = option("its private key (PEM; not readable by other users)", PATH,
                                             default=None, group=OIDC)
    learn: timedelta = option(
        "continuous verification: how long each identity's behaviour is learned before its baseline "
        "detectors fire and before any response rule may quarantine it (baselines keep adapting after)",
        DURATION, default=timedelta(days=7), group=DETECTION)
    detect_dry_run: str = option(
        "on: response rules say what they would quarantine (audited, counted) and quarantine nothing, "
        "whatever the Response documents say", one_of("on", "off"), default="off", group=DETECTION)
    alert_webhook: tuple[str, ...] = option(
        "POST every alert as JSON to this URL (https, or http to a loopback address); repeatable",
        WEBHOOK_URL, default=(), repeat=True, group=DETECTION)
    signing_workers: int = option(
        "processes that sign X.509-SVIDs, for issuance on every core; 0 signs in a thread of the server "
        "process (default: the number of CPUs)", COUNT, default_factory=lambda: os.cpu_count() or 1)
    leader_ttl: int = internal("seconds; a dead leader's duties move to another replica after about this",
                               default=5)

    def __post_init__(self) -> None:
        given = [flag for flag, value in (("--etcd-ca", self.etcd_ca), ("--etcd-cert", self.etcd_cert),
                                          ("--etcd-key", self.etcd_key), ("--etcd-user", self.etcd_user),
                                          ("--etcd-password-file", self.etcd_password_file)) if value]
        if self.embedded and given:
            raise ConfigError(f"{', '.join(given)}: etcd options, but the store is {self.store!r}; "
                              "give an etcd://host:port store url or drop them")
        if not self.embedded and (problem := self.etcd_security.problem(self.store.partition("://")[0])):
            raise ConfigError(problem)
        if self.attest_bind is None and split_host_port(self.bind, listening=True)[1] == 65535:
            raise ConfigError("--bind on port 65535 leaves no port + 1 for attestation; give --attest-bind")
        if self.login_bind and not self.admin_bind:
            raise ConfigError("--login-bind serves operator login for the remote admin API; give --admin-bind too")
        if self.admin_bind and not self.login_bind and split_host_port(self.admin_bind, listening=True)[1] == 65535:
            raise ConfigError("--admin-bind on port 65535 leaves no port + 1 for operator login; give --login-bind")
        if self.console_bind and not self.admin_bind:
            raise ConfigError("--console-bind: the console is a client of the admin and login listeners; "
                              "give --admin-bind too (and --login-bind, unless its port + 1 suits)")
        if (self.console_cert is None) != (self.console_key is None):
            raise ConfigError("--console-cert and --console-key go together: give both, or neither to serve the "
                              "console with the server's own SVID")
        self._check_keys()
        self._check_oidc()
        if not timedelta(seconds=1) <= self.console_session_ttl <= MAX_CONSOLE_SESSION:
            raise ConfigError("--console-session-ttl must be between 1s and 12h")
        if not timedelta(minutes=1) <= self.operator_cert_ttl <= timedelta(hours=12):
            raise ConfigError("--operator-cert-ttl must be between 1m and 12h")
        if self.flow_rollup_interval < timedelta(seconds=1) or self.flow_retention < timedelta(hours=1):
            raise ConfigError("--flow-rollup-interval must be at least 1s and --flow-retention at least 1h")
        if self.access_approvers < 1:
            raise ConfigError("--access-approvers must be at least 1 (four eyes: someone other than the requester)")
        if self.access_max_grant < timedelta(minutes=1) or self.access_approval_window < timedelta(minutes=1):
            raise ConfigError("--access-max-grant and --access-approval-window must be at least 1m")
        if self.login_max_failures < 1:
            raise ConfigError("--login-max-failures must be at least 1")
        web_files = (self.bundle_endpoint_cert, self.bundle_endpoint_key)
        if self.bundle_endpoint_profile not in ("https_spiffe", "https_web"):
            raise ConfigError(
                f"--bundle-endpoint-profile {self.bundle_endpoint_profile!r}: use https_spiffe or https_web")
        if self.bundle_endpoint_profile == "https_web" and self.bundle_endpoint and not all(web_files):
            raise ConfigError(
                "--bundle-endpoint-profile https_web needs --bundle-endpoint-cert and --bundle-endpoint-key")
        if self.bundle_endpoint_profile == "https_spiffe" and any(web_files):
            raise ConfigError(
                "--bundle-endpoint-cert/--bundle-endpoint-key go with --bundle-endpoint-profile https_web")

    def _check_keys(self) -> None:
        pkcs11 = [flag for flag, value in (("--pkcs11-module", self.pkcs11_module),
                                           ("--pkcs11-token-label", self.pkcs11_token_label),
                                           ("--pkcs11-pin-file", self.pkcs11_pin_file)) if value]
        upstream_in_token = bool(self.upstream_ca_key and self.upstream_ca_key.startswith("pkcs11:"))
        if self.key_manager == "pkcs11" or upstream_in_token:
            missing = [flag for flag in ("--pkcs11-module", "--pkcs11-token-label", "--pkcs11-pin-file")
                       if flag not in pkcs11]
            if missing:
                why = "--key-manager pkcs11" if self.key_manager == "pkcs11" else "an upstream key in a token"
                raise ConfigError(f"{why} needs {', '.join(missing)} (the HSM's library, the token and its PIN)")
        elif pkcs11:
            raise ConfigError(f"{', '.join(pkcs11)}: PKCS#11 options, but the key manager is software; "
                              "add --key-manager pkcs11 or drop them")
        if self.pkcs11_signing_ca and self.key_manager != "pkcs11":
            raise ConfigError("--pkcs11-signing-ca keeps the signing CA key in the HSM; add --key-manager pkcs11")
        if (self.upstream_ca_cert is None) != (self.upstream_ca_key is None):
            raise ConfigError("--upstream-ca-cert and --upstream-ca-key go together: the bank CA's certificate "
                              "chain and its key")

    def _check_oidc(self) -> None:
        if self.oidc_discovery_bind and not self.oidc_issuer:
            raise ConfigError("--oidc-discovery-bind needs --oidc-issuer, the https:// URL relying parties "
                              "will be configured with")
        if self.oidc_issuer and (problem := oidc_issuer_problem(self.oidc_issuer)):
            raise ConfigError(f"--oidc-issuer {self.oidc_issuer[:100]!r}: {problem}")
        if (self.oidc_discovery_cert is None) != (self.oidc_discovery_key is None):
            raise ConfigError("--oidc-discovery-cert and --oidc-discovery-key go together: give both, or neither "
                              "to serve discovery with the server's own SVID")

    @property
    def attest_address(self) -> str:
        """--attest-bind, else --bind's host with its port + 1 (agents' default --attest-server);
        with --bind on port 0 (any free port), any free port as well."""
        if self.attest_bind:
            return self.attest_bind
        host, port = split_host_port(self.bind, listening=True)
        return join_host_port(host, port + 1 if port else 0)

    @property
    def login_address(self) -> str | None:
        """--login-bind, else --admin-bind's host with its port + 1 (where `trustmesh login` looks);
        none without --admin-bind."""
        if self.login_bind or not self.admin_bind:
            return self.login_bind
        host, port = split_host_port(self.admin_bind, listening=True)
        return join_host_port(host, port + 1 if port else 0)

    @property
    def audit_anchor_target(self) -> str:
        return self.audit_anchor or str(self.data_dir / "audit-anchor.jsonl")

    @property
    def bundle_path(self) -> Path:
        return self.data_dir / "bundle.pem"

    @property
    def admin_socket_path(self) -> Path:
        return self.admin_socket or self.data_dir / "admin.sock"

    @property
    def embedded(self) -> bool:
        scheme, sep, _ = self.store.partition("://")
        return not (sep and scheme in ETCD_SCHEMES)

    @property
    def etcd_security(self) -> EtcdSecurity:
        return EtcdSecurity(ca=self.etcd_ca, cert=self.etcd_cert, key=self.etcd_key, user=self.etcd_user,
                            password_file=self.etcd_password_file)
