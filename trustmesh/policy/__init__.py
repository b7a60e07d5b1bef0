"""Allowlists as code: the model, YAML loading with precise problems, and the decision."""

from trustmesh.policy.loader import Loaded, Problem, bundle_documents, load_many, load_paths, load_text
from trustmesh.policy.model import Allowlist, AllowRule, Decision, IdPattern, Policy, PolicyError
from trustmesh.policy.routes import AmbiguousPathError, HttpRequest, PathPattern, normalize_path, route_label

__all__ = ["AllowRule", "Allowlist", "AmbiguousPathError", "Decision", "HttpRequest", "IdPattern", "Loaded",
           "PathPattern", "Policy", "PolicyError", "Problem", "bundle_documents", "load_many", "load_paths",
           "load_text", "normalize_path", "route_label"]
