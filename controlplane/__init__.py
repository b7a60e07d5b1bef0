"""The trustmesh control plane: CA, registration, policy, audit and their gRPC services."""
