"""Final results as a worker publishes them, for tests of the result path."""

from __future__ import annotations

from shared.schemas import GenerationResult


def result(request_id: str, text: str = "out", finish_reason: str = "stop") -> GenerationResult:
    """A finished request's answer (``text``, one token)."""
    return GenerationResult(
        request_id=request_id,
        text=text,
        finish_reason=finish_reason,
        prompt_tokens=3,
        completion_tokens=1,
        model="m",
        worker_id="w",
        queued_at=0.0,
        started_at=0.0,
    )
