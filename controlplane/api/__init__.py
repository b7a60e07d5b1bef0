"""gRPC services of the control plane (node, admin), health and the bundle endpoint.

Servicers are thin: they convert protobuf messages at the edge, call transport-free
handlers, and let `status.py` turn domain errors into gRPC status codes.
"""
