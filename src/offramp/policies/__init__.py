"""Exit policies: one file each, one registry. See ``offramp.policies.base`` for the protocol."""

from __future__ import annotations

import difflib
from typing import Any

from offramp.policies.base import ExitPolicy, ExitSignals, ExitSpace, PolicyState, require_signals
from offramp.policies.deer import DeerPolicy
from offramp.policies.entropy import EntropyPolicy
from offramp.policies.gate import GatePolicy
from offramp.policies.margin import MarginPolicy
from offramp.policies.max_prob import MaxProbPolicy
from offramp.policies.never import NeverPolicy
from offramp.policies.oracle import OraclePolicy
from offramp.policies.patience import PatiencePolicy
from offramp.policies.ponder_sample import PonderSamplePolicy
from offramp.policies.probe import ProbeExitPolicy
from offramp.policies.q_exit import QExitPolicy
from offramp.policies.saturation import SaturationPolicy
from offramp.policies.static import StaticPolicy
from offramp.policies.token_confidence import TokenConfidencePolicy

POLICIES: dict[str, type[ExitPolicy]] = {
    "never": NeverPolicy,
    "static": StaticPolicy,
    "max_prob": MaxProbPolicy,
    "entropy": EntropyPolicy,
    "margin": MarginPolicy,
    "saturation": SaturationPolicy,
    "patience": PatiencePolicy,
    "ponder_sample": PonderSamplePolicy,
    "q_exit": QExitPolicy,
    "gate": GatePolicy,
    "token_confidence": TokenConfidencePolicy,
    "deer": DeerPolicy,
    "oracle": OraclePolicy,
}


ARTEFACT_POLICIES: dict[str, type[ExitPolicy]] = {"probe": ProbeExitPolicy}  # built from a fitted file (path=)


def make_policy(spec: str | dict[str, Any] | ExitPolicy | None, **params: Any) -> ExitPolicy:
    """Build a policy from a name + parameters, a {"type": name, ...} dict, or pass one through.

    ``POLICIES`` holds the rules that have defaults; ``probe`` (LYNX, alias ``lynx``) needs a
    fitted probe: ``make_policy("probe", probe=...)``, or ``offramp.calibration.lynx.probe_policy(path)``."""
    if isinstance(spec, ExitPolicy):
        return spec
    if spec is None:
        spec = "never"
    if isinstance(spec, dict):
        params = {**{k: v for k, v in spec.items() if k != "type"}, **params}
        spec = spec.get("type")
    spec = "probe" if spec == "lynx" else spec
    cls = ARTEFACT_POLICIES.get(spec) or POLICIES.get(spec)  # type: ignore[arg-type]
    if cls is None:
        known = sorted(POLICIES) + sorted(ARTEFACT_POLICIES)
        close = difflib.get_close_matches(str(spec), known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"unknown policy {spec!r}; {hint}known policies: {known}")
    fields = policy_fields(cls)
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise ValueError(f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} in the "
                         f"{spec!r} policy; it takes {', '.join(['type', *fields])}")
    try:
        return cls(**params)
    except TypeError as e:
        raise ValueError(f"bad parameters for policy {spec!r}: {e}") from None


def policy_fields(cls: type[ExitPolicy]) -> list[str]:
    """The settings a policy type takes (its constructor's keyword arguments)."""
    import inspect

    return [n for n, p in inspect.signature(cls).parameters.items()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def named_or_stored(spec: str | dict[str, Any] | ExitPolicy | None, stored: dict[str, Any] | None) -> ExitPolicy:
    """The policy a user names, against the one a checkpoint stores: None is the stored one; a rule
    named without its setting (a bare name, ``"entropy"``) takes the stored setting when the stored
    policy is that rule, and is an error otherwise for a rule that has a setting (its default would
    be used silently, whatever the data); anything else is ``make_policy(spec)``."""
    if spec is None:
        return make_policy(stored)
    name = spec.strip() if isinstance(spec, str) else None
    if name is None or name.startswith("{"):
        return make_policy(spec)
    name = "probe" if name == "lynx" else name
    if stored and stored.get("type") == name:
        return make_policy(stored)
    policy = make_policy(name)
    if policy.threshold_field is not None:
        raise ValueError(f"policy {name!r} needs its {policy.threshold_field}: give it ({{'type': {name!r}, "
                         f"{policy.threshold_field!r}: ...}}, or --value on the command line), or calibrate one "
                         f"into the checkpoint (offramp calibrate --policy {name}); the checkpoint stores "
                         f"{(stored or {}).get('type')!r}")
    return policy


__all__ = ["ARTEFACT_POLICIES", "POLICIES", "DeerPolicy", "ExitPolicy", "ProbeExitPolicy", "TokenConfidencePolicy",
           "ExitSignals", "ExitSpace", "PolicyState", "make_policy", "named_or_stored", "require_signals"]
