"""Typed errors raised where they start, and the one table that turns them into words."""

from __future__ import annotations

import difflib
import math


class ParleyError(Exception):
    """Base of every error the core knows how to explain to a user."""


# --- backends -----------------------------------------------------------------------------


class BackendError(ParleyError):
    """A model backend failed. `backend` is the backend's configured name."""

    def __init__(self, backend: str, message: str = "") -> None:
        super().__init__(f"{backend}: {message}" if message else backend)
        self.backend = backend
        self.message = message


class BackendUnreachable(BackendError):
    """Could not connect, or the connection broke before any output."""


class BackendTimeout(BackendError):
    """No first chunk, or no next chunk, within the configured time."""


class ModelNotFound(BackendError):
    def __init__(self, backend: str, model: str, message: str = "") -> None:
        super().__init__(backend, message or f"model '{model}' not found")
        self.model = model
        self.suggestions: list[str] = []


class BackendUnauthorized(BackendError):
    """The backend rejected our key (401/403). The key itself is never in the message."""


class BackendUsageLimit(BackendError):
    """Cloud usage limit (429) or empty balance (402); the server's message is kept."""

    def __init__(self, backend: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(backend, message)
        self.retry_after = retry_after


class BackendBusy(BackendError):
    """The backend's queue is full (503)."""


class BackendBadRequest(BackendError):
    """The backend refused the request itself (400): unsupported feature, prompt too long…"""


class BackendStreamError(BackendError):
    """The backend failed after output had started (an `{"error"}` line, a broken stream)."""


# --- users --------------------------------------------------------------------------------


class UserRateLimited(ParleyError):
    def __init__(self, retry_after: float, *, in_flight: bool = False) -> None:
        super().__init__(f"rate limited for {retry_after:.0f}s")
        self.retry_after = retry_after
        self.in_flight = in_flight


class TokensSpent(ParleyError):
    """The person's token budget for the current window is used up."""

    def __init__(self, limit: int, period: str, retry_after: float) -> None:
        super().__init__(f"token budget of {limit} per {period} spent")
        self.limit = limit
        self.period = period
        self.retry_after = retry_after


class InputTooLong(ParleyError):
    def __init__(self, length: int, limit: int) -> None:
        super().__init__(f"input of {length} chars over limit {limit}")
        self.length = length
        self.limit = limit


class NoModelAvailable(ParleyError):
    """No model was chosen and no backend lists any."""


class ThreadBusy(ParleyError):
    """An earlier message in the same thread is still being answered (past the wait limit)."""


class AttachmentUnavailable(ParleyError):
    """A platform would not hand over an attached file; `reason` says why, for its user."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NotRegenerable(ParleyError):
    """Regenerate was pressed on an answer that is no longer the thread's newest."""


class StateUnavailable(ParleyError):
    """Redis could not be reached (`after_reply`: only when saving a reply already shown)."""

    def __init__(self, *, after_reply: bool = False) -> None:
        super().__init__("redis unavailable")
        self.after_reply = after_reply


# --- the table ----------------------------------------------------------------------------


def seconds_in_words(value: float) -> str:
    n = max(1, math.ceil(value))
    if n < 120:
        return f"{n} second{'s' if n != 1 else ''}"
    minutes = math.ceil(n / 60)
    return f"{minutes} minutes"


def close_matches(name: str, candidates: list[str], n: int = 3) -> list[str]:
    """Catalog names that look like `name` (typos, a missing tag, another tag)."""
    by_base = {c.split(":")[0]: c for c in candidates}
    found = difflib.get_close_matches(name, candidates, n=n, cutoff=0.5)
    for base in difflib.get_close_matches(name.split(":")[0], list(by_base), n=n, cutoff=0.6):
        if by_base[base] not in found:
            found.append(by_base[base])
    prefix = [c for c in candidates if c.startswith(name) and c not in found]
    return (prefix + found)[:n]


def describe(error: BaseException) -> str:
    """The short sentence a user sees for an error. Never contains a secret."""
    match error:
        case ModelNotFound():
            text = f"The model `{error.model}` isn't available on `{error.backend}`."
            if error.suggestions:
                text += " Did you mean " + ", ".join(f"`{s}`" for s in error.suggestions) + "?"
            return text + " Use `/model` to see the models and switch."
        case BackendUsageLimit():
            when = (
                f" Try again in {seconds_in_words(error.retry_after)}." if error.retry_after else ""
            )
            return f"`{error.backend}` refused: usage limit reached — {error.message}.{when}"
        case BackendUnauthorized():
            return (
                f"`{error.backend}` rejected Parley's API key. "
                "An operator needs to check the key in Parley's settings."
            )
        case BackendBusy():
            return f"`{error.backend}` is busy right now (its queue is full). Try again shortly."
        case BackendTimeout():
            return f"`{error.backend}` took too long to answer. Try again, or a smaller model."
        case BackendUnreachable():
            return f"I can't reach the model server `{error.backend}` right now. Try again soon."
        case BackendBadRequest():
            return f"`{error.backend}` refused the request: {error.message}"
        case BackendStreamError():
            return f"The model stopped with an error: {error.message}"
        case BackendError():
            return f"`{error.backend}` failed: {error.message}"
        case UserRateLimited():
            if error.in_flight:
                return (
                    "You already have replies being written. "
                    f"Try again in {seconds_in_words(error.retry_after)}, once one has finished."
                )
            wait = seconds_in_words(error.retry_after)
            return f"You're sending requests too fast. Try again in {wait}."
        case TokensSpent():
            return (
                f"You've used your {error.limit:,} tokens for this {error.period}. "
                f"It resets in {seconds_in_words(error.retry_after)}."
            )
        case InputTooLong():
            return (
                f"Your message is {error.length:,} characters; the limit is {error.limit:,}. "
                "Please shorten it or split it up."
            )
        case NoModelAvailable():
            return "No model is available: no backend lists any model. Ask an operator."
        case ThreadBusy():
            return "I'm still answering an earlier message here. Try again when it's done."
        case NotRegenerable():
            return "Only the newest answer in a thread can be regenerated."
        case StateUnavailable() if error.after_reply:
            return (
                "Parley's memory store (Redis) is unavailable right now, "
                "so I won't remember this exchange in the thread."
            )
        case StateUnavailable():
            return "Parley's memory store (Redis) is unavailable right now. Try again shortly."
        case _:
            return "Something went wrong on Parley's side; the details are in its log."
