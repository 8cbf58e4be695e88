"""Refused attempts, counted per reason and logged with the caller: who knocked, and why the door stayed shut."""

from __future__ import annotations

import logging
from collections import Counter

import grpc

from services.errors import AiosError

log = logging.getLogger("aios.audit")

# The refusals worth counting: a bad credential, a denied access, a limit reached.
REASONS = {
    grpc.StatusCode.UNAUTHENTICATED: "unauthenticated",
    grpc.StatusCode.PERMISSION_DENIED: "permission_denied",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "resource_exhausted",
}


class Audit:
    def __init__(self) -> None:
        self.refusals: Counter[str] = Counter()

    def note(self, error: AiosError, caller: str, method: str, peer: str) -> None:
        """Counts and logs `error` if it is a refusal; other errors are the caller's bad input, not an attempt."""
        reason = REASONS.get(error.code)
        if reason is None:
            return
        self.refusals[reason] += 1
        log.warning("refused %s: %s by %s from %s: %s", reason, method, caller, peer, error.message)
