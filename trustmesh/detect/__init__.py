"""Continuous verification: per-identity baselines learned from flow records, detectors that
explain what they see, and the response rules that turn scores into alerts or quarantine.

The server (controlplane/detection.py) and `trustmesh detect replay` run the same Engine, so
a trace replayed offline gives exactly the alerts the server would have raised.
"""
