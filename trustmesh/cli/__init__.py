"""The `trustmesh` command: the composition root, the only kernel module that may import
both `controlplane` and `agent`."""
