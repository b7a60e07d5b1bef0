"""trustmesh: the shared kernel (SPIFFE identities, SVIDs, bundles, policy, TLS helpers).

The kernel performs no I/O of its own beyond files it is handed; the control plane
(`controlplane`) and the node agent (`agent`) build on it and meet only on the wire.
"""

__version__ = "0.1.0"
