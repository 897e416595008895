"""Moved: the token confidence rule is the registered policy ``offramp.policies.token_confidence``."""

from offramp.policies.token_confidence import TokenConfidencePolicy

__all__ = ["TokenConfidencePolicy"]
