"""The trustmesh node agent: attests its node, caches and rotates SVIDs, serves the SPIFFE
Workload API on a unix socket and enforces allowlists. Meets the control plane only on the
wire (trustmesh/_proto), never by import."""
