"""A tiny workload for the demo: asks the agent's Workload API who it is.

Usage: demo_workload.py SOCKET [--uid N] [--updates N]
Prints one line per X509-SVID message: SPIFFE ID, serial, and validity.
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc

from trustmesh._proto.spiffe.workload import workload_pb2, workload_pb2_grpc
from trustmesh.der import load_der_certificates


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("socket")
    parser.add_argument("--uid", type=int, help="drop to this uid (and gid) before connecting")
    parser.add_argument("--updates", type=int, default=1, help="how many messages to print")
    args = parser.parse_args()
    if args.uid is not None:
        os.setgid(args.uid)
        os.setuid(args.uid)
    stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(grpc.insecure_channel(f"unix:{args.socket}"))
    try:
        stream = stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=[("workload.spiffe.io", "true")],
                                    timeout=60)
        for count, message in enumerate(stream, start=1):
            for svid in message.svids:
                leaf = load_der_certificates(svid.x509_svid)[0]
                life = (leaf.not_valid_after_utc - leaf.not_valid_before_utc).total_seconds()
                print(
                    f"uid {os.getuid()}: {svid.spiffe_id}  serial …{leaf.serial_number % 100000:05d}  "
                    f"valid until {leaf.not_valid_after_utc:%H:%M:%S} UTC ({life:.0f}s incl. 30s clock-skew allowance)",
                    flush=True,
                )
            if count >= args.updates:
                stream.cancel()
                break
    except grpc.RpcError as err:
        if err.code() == grpc.StatusCode.CANCELLED:
            return 0
        print(f"uid {os.getuid()}: refused: {err.code().name}: {err.details()}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
