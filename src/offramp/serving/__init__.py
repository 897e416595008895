"""Serving: early-exit classification behind Ray Serve (``offramp serve``).

``service`` holds what a replica does (request checks, batches, metrics) and runs without a
server; ``app`` builds the HTTP application and its Ray Serve deployment."""

from offramp.serving.service import ClassifyService, Item, RequestError

__all__ = ["ClassifyService", "Item", "RequestError"]
