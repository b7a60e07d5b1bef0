"""Responses as code: what an anomaly of a detector on an identity leads to.

A `kind: Response` document sits next to the allowlists, is linted, tested, applied and
versioned with them, and is read by the server's detection service and by `trustmesh detect
replay`:

    apiVersion: trustmesh/v1
    kind: Response
    metadata: {name: payments-responses, owner: security}
    spec:
      dry_run: false                  # true: say what would be quarantined, quarantine nothing
      rules:
        - identity: spiffe://example.org/payments      # exact ID, prefix/*, or "*"
          detectors: [sweep, deny_burst]               # or ["*"]
          action: quarantine                           # ignore, alert or quarantine
          above: 0.8                                   # at or above this score (0 to 1)
          target: identity                             # or node: quarantine the node it was seen on

For one anomaly, the rules that match its identity and detector decide: a matching `ignore`
rule is an exception that silences it; otherwise the strongest action whose `above` the score
reaches (quarantine implies alert). When no rule
matches, the built-in default applies: alert at 0.5, never quarantine, so nothing is ever
quarantined unless a person declared it. Dry run is global: one document saying it is
enough (a partial dry run would quarantine for some rules and not others, which nobody
reviewing one document would expect).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    # Imported where used instead: model.py's Policy carries a ResponsePolicy.
    from trustmesh.policy.model import IdPattern

Action = Literal["ignore", "alert", "quarantine"]
Target = Literal["identity", "node"]
ACTIONS: tuple[Action, ...] = ("ignore", "alert", "quarantine")
TARGETS: tuple[Target, ...] = ("identity", "node")
_STRENGTH = {"ignore": 0, "alert": 1, "quarantine": 2}

KIND = "Response"
SPEC_KEYS = {"dry_run", "rules"}
RULE_KEYS = {"identity", "detectors", "action", "above", "target"}
MAX_RULES_PER_RESPONSE = 1000
DEFAULT_ALERT_SCORE = 0.5
# What the detectors are called; detect/detectors.py owns what each does.
DETECTORS = ("new_peer", "sweep", "slow_sweep", "volume", "odd_hours", "new_node", "deny_burst")
ANY = "*"


@dataclass(frozen=True, slots=True)
class ResponseRule:
    name: str  # the Response document's name
    index: int  # position in its spec.rules
    identity: IdPattern | None  # None: every identity, unverified callers included
    detectors: frozenset[str]  # empty: every detector
    action: Action
    above: float
    target: Target = "identity"

    @property
    def label(self) -> str:
        return f"{self.name} rules[{self.index}]"

    def matches(self, identity: str, detector: str) -> bool:
        if self.detectors and detector not in self.detectors:
            return False
        if self.identity is None:
            return True
        return _pattern_matches(self.identity, identity)


def _pattern_matches(pattern: IdPattern, identity: str) -> bool:
    # Compared as text: an identity from a trace is not trusted to parse, and an unverified
    # caller (unverified:<address>) matches only "*".
    exact = f"spiffe://{pattern.trust_domain.name}{pattern.path}"
    if not pattern.is_prefix:
        return identity == exact
    return identity.startswith(exact + "/")


@dataclass(frozen=True, slots=True)
class Verdict:
    action: Action
    rule: str  # which rule decided ("default" for the built-in one)
    target: Target = "identity"


DEFAULT_VERDICT_RULE = "default (alert at 0.5)"


@dataclass(frozen=True)
class ResponseDocument:
    name: str
    owner: str
    rules: tuple[ResponseRule, ...]
    dry_run: bool = False


@dataclass(frozen=True)
class ResponsePolicy:
    documents: tuple[ResponseDocument, ...] = ()
    force_dry_run: bool = False  # the server's --detect-dry-run, replay's --dry-run

    @property
    def rules(self) -> tuple[ResponseRule, ...]:
        return tuple(r for d in self.documents for r in d.rules)

    @property
    def dry_run(self) -> bool:
        return self.force_dry_run or any(d.dry_run for d in self.documents)

    def verdict(self, identity: str, detector: str, score: float) -> Verdict:
        matching = [r for r in self.rules if r.matches(identity, detector)]
        if not matching:
            action: Action = "alert" if score >= DEFAULT_ALERT_SCORE else "ignore"
            return Verdict(action, DEFAULT_VERDICT_RULE)
        # An ignore rule is an exception (what this identity does is normal for it): it wins
        # over every alert and quarantine rule that would otherwise apply.
        exception = next((r for r in matching if r.action == "ignore" and score >= r.above), None)
        if exception is not None:
            return Verdict("ignore", exception.label)
        best: Verdict = Verdict("ignore", matching[0].label)
        for rule in matching:
            if score >= rule.above and _STRENGTH[rule.action] > _STRENGTH[best.action]:
                best = Verdict(rule.action, rule.label, rule.target)
        return best


def load_response(raw: dict[str, Any], name: str, problem: Any) -> tuple[tuple[ResponseRule, ...], bool] | None:
    """The rules and dry-run switch of one Response document's `spec`, reporting each problem
    through `problem(field, message)` (the loader's per-document reporter)."""
    spec = raw.get("spec")
    if not isinstance(spec, dict):
        problem("spec", "is required: {rules: [...], dry_run: optional true/false}")
        return None
    for key in sorted(set(map(str, spec)) - SPEC_KEYS):
        problem(f"spec.{key}", f"unknown key; allowed here: {', '.join(sorted(SPEC_KEYS))}")
    dry_run = spec.get("dry_run", False)
    if not isinstance(dry_run, bool):
        problem("spec.dry_run", f"must be true or false, got {dry_run!r}")
        dry_run = False
    raw_rules = spec.get("rules")
    if not isinstance(raw_rules, list) or not raw_rules:
        problem("spec.rules", "is required: a list of {identity, detectors, action, above, target}")
        return None
    if len(raw_rules) > MAX_RULES_PER_RESPONSE:
        problem("spec.rules", f"{len(raw_rules)} rules, above the limit of {MAX_RULES_PER_RESPONSE} "
                              "(MAX_RULES_PER_RESPONSE)")
        return None
    rules: list[ResponseRule] = []
    for i, rule in enumerate(raw_rules):
        where = f"spec.rules[{i}]"
        if not isinstance(rule, dict):
            problem(where, "must be a mapping with identity, detectors, action and above")
            continue
        for key in sorted(set(map(str, rule)) - RULE_KEYS):
            problem(f"{where}.{key}", f"unknown key; allowed here: {', '.join(sorted(RULE_KEYS))}")
        parsed = _rule(rule, where, name, i, problem)
        if parsed is not None:
            rules.append(parsed)
    return tuple(rules), dry_run


def _rule(rule: dict[str, Any], where: str, name: str, index: int, problem: Any) -> ResponseRule | None:
    from trustmesh.policy.model import IdPattern, PolicyError

    ok = True
    identity_text = rule.get("identity")
    identity: IdPattern | None = None
    if identity_text != ANY:
        try:
            identity = IdPattern.parse(identity_text)  # type: ignore[arg-type]
        except PolicyError as err:
            problem(f"{where}.identity", f"{err}; or \"*\" for every identity")
            ok = False
    raw_detectors = rule.get("detectors", [ANY])
    if isinstance(raw_detectors, str):
        raw_detectors = [raw_detectors]
    detectors: set[str] = set()
    if not isinstance(raw_detectors, list) or not raw_detectors:
        problem(f"{where}.detectors", f"must be a list of detectors ({', '.join(DETECTORS)}) or [\"*\"]")
        ok = False
    else:
        for j, detector in enumerate(raw_detectors):
            if detector == ANY:
                continue
            if detector not in DETECTORS:
                problem(f"{where}.detectors[{j}]", f"unknown detector {str(detector)[:40]!r}; the detectors are "
                                                   f"{', '.join(DETECTORS)}")
                ok = False
            else:
                detectors.add(detector)
        if ANY in raw_detectors:
            detectors.clear()
    action = rule.get("action")
    if action not in ACTIONS:
        problem(f"{where}.action", f"must be one of {', '.join(ACTIONS)}, got {str(action)[:40]!r}")
        ok = False
    above = rule.get("above", 0.0 if action == "ignore" else None)
    if isinstance(above, bool) or not isinstance(above, (int, float)) or not 0.0 <= above <= 1.0:
        problem(f"{where}.above", f"must be a score from 0 to 1 (e.g. 0.8), got {above!r}")
        ok = False
    target = rule.get("target", "identity")
    if target not in TARGETS:
        problem(f"{where}.target", f"must be identity or node, got {str(target)[:40]!r}")
        ok = False
    elif target == "node" and action != "quarantine":
        problem(f"{where}.target", "node is a quarantine target: use it with action: quarantine")
        ok = False
    if not ok:
        return None
    return ResponseRule(name, index, identity, frozenset(detectors), action, float(above), target)  # type: ignore[arg-type]


def rule_to_dict(rule: ResponseRule) -> dict[str, Any]:
    out: dict[str, Any] = {"identity": str(rule.identity) if rule.identity else ANY,
                           "detectors": sorted(rule.detectors) or [ANY], "action": rule.action, "above": rule.above}
    if rule.target != "identity":
        out["target"] = rule.target
    return out


def to_document(document: ResponseDocument) -> dict[str, Any]:
    """`document` as the YAML document that loads back to it."""
    meta = {"name": document.name} | ({"owner": document.owner} if document.owner else {})
    spec: dict[str, Any] = {"dry_run": True} if document.dry_run else {}
    spec["rules"] = [rule_to_dict(r) for r in document.rules]
    return {"apiVersion": "trustmesh/v1", "kind": KIND, "metadata": meta, "spec": spec}
