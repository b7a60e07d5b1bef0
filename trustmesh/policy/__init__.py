"""Allowlists as code: the model, YAML loading with precise problems, and the decision."""

from trustmesh.policy.loader import Loaded, Problem, bundle_documents, load_many, load_paths, load_text
from trustmesh.policy.model import Allowlist, AllowRule, Decision, IdPattern, Policy, PolicyError

__all__ = ["AllowRule", "Allowlist", "Decision", "IdPattern", "Loaded", "Policy", "PolicyError", "Problem",
           "bundle_documents", "load_many", "load_paths", "load_text"]
