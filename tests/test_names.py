"""The torch-free vocabularies of offramp.names are the registries they name."""

from __future__ import annotations

from offramp import names
from offramp.calibration import lynx, risk
from offramp.engines.classify import SIGNALS as CLASSIFY_SIGNALS
from offramp.engines.generate import SIGNALS as GENERATE_SIGNALS
from offramp.engines.reason import SIGNALS as REASON_SIGNALS
from offramp.heads import LM_HEADS
from offramp.policies import ARTEFACT_POLICIES, POLICIES, make_policy


def _usable(signals: tuple[str, ...]) -> set[str]:
    """The registered policies whose signals an engine supplies."""
    return {n for n, cls in POLICIES.items() if set(cls.needs) <= set(signals)}


def test_policy_names_are_what_each_engine_can_run():
    assert set(names.CLASSIFY_POLICIES) == _usable(CLASSIFY_SIGNALS) - {"token_confidence", "deer"}
    assert set(names.GENERATION_POLICIES) == _usable(GENERATE_SIGNALS)
    assert set(names.REASON_POLICIES) - set(ARTEFACT_POLICIES) <= _usable(REASON_SIGNALS)
    assert set(ARTEFACT_POLICIES) <= set(names.REASON_POLICIES)
    for name in names.CLASSIFY_POLICIES + names.GENERATION_POLICIES:
        assert make_policy(name).type == name


def test_vocabularies_equal_their_registries():
    assert set(names.LM_HEAD_TYPES) == set(LM_HEADS)
    assert set(names.CACHE_STRATEGIES) == set(names.ATTENTION_STRATEGIES) | set(names.SSM_STRATEGIES)
    assert risk.RISKS == names.RISKS and risk.PVALUES == names.PVALUES and lynx.RISKS == names.CHAIN_RISKS
