"""Turn a store url from the configuration into an open ``Store``."""

from __future__ import annotations

from pathlib import Path

from trustmesh.controlplane.store.etcd import (
    DEFAULT_NAMESPACE,
    DEFAULT_TIMEOUT,
    SCHEMES,
    EtcdKV,
    EtcdSecurity,
    parse_endpoints,
)
from trustmesh.controlplane.store.sqlite import SqliteKV
from trustmesh.controlplane.store.store import Store
from trustmesh.errors import StoreError

SQLITE_FILE = "store.db"

_USAGE = (
    "use 'sqlite' (a file in the data directory), 'sqlite:///path/to/store.db' "
    "or 'etcd://host:port[,host:port...][/namespace]' (etcd+https:// for TLS always)"
)


async def open_store(
    url: str,
    data_dir: Path,
    *,
    etcd_namespace: str = DEFAULT_NAMESPACE,
    etcd_timeout: float = DEFAULT_TIMEOUT,
    etcd_security: EtcdSecurity | None = None,
) -> Store:
    """Open the store named by ``url``.

    ``sqlite`` keeps ``store.db`` (mode 0600) in ``data_dir``; ``sqlite:///abs/path.db``
    names the file; ``etcd://h:p[,h:p]`` connects to the first endpoint that answers and
    raises StoreUnavailableError naming them all when none does. ``etcd_security`` (TLS
    and user) applies to etcd only; ``etcd+https://`` demands TLS, ``etcd+http://`` refuses it.
    """
    scheme, sep, rest = url.partition("://")
    if url == "sqlite":
        return Store(await SqliteKV.open(data_dir / SQLITE_FILE))
    if url.startswith("sqlite://"):
        path = url[len("sqlite://") :]
        if not path.startswith("/") or path == "/":
            raise StoreError(f"sqlite store url {url!r} needs an absolute file path; {_USAGE}")
        return Store(await SqliteKV.open(Path(path)))
    if sep and scheme in SCHEMES:
        # etcd://h:p[,h:p]/name keeps this deployment's keys under /name/ (several
        # deployments, or test runs, can share one etcd cluster without seeing each other).
        hosts, slash, prefix = rest.partition("/")
        namespace = f"/{prefix.strip('/')}/" if slash and prefix.strip("/") else etcd_namespace
        kv = await EtcdKV.connect(
            parse_endpoints(f"{scheme}://{hosts}"), namespace=namespace, timeout=etcd_timeout,
            security=etcd_security, scheme=scheme,
        )
        return Store(kv)
    raise StoreError(f"unknown store url {url!r}; {_USAGE}")
