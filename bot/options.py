"""How each reply is asked for: the model's options (PARLEY_MODEL_OPTIONS), its cap, whether it
thinks, and the context window the history is packed for."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from bot.backends.base import ModelInfo, Options, Think
from bot.settings import ModelOptions, Settings

THINK: dict[str, Think] = {"off": False, "on": True}


def matches(model: str, glob: str) -> bool:
    """`glob` names `model`: as written, without its backend prefix, or without `:latest`."""
    bare = model.partition("/")[2] if "/" in model else model
    names = {model, bare, model.removesuffix(":latest"), bare.removesuffix(":latest")}
    return any(fnmatch.fnmatchcase(n, glob) for n in names)


def any_matches(model: str, globs: Iterable[str]) -> bool:
    return any(matches(model, glob) for glob in globs)


def configured(model: str, table: dict[str, ModelOptions]) -> ModelOptions:
    """The options the operator set for `model`: every entry that names it, in the order
    written, a later one's keys over an earlier one's."""
    found: dict[str, Any] = {}
    for glob, options in table.items():
        if matches(model, glob):
            found.update(options.model_dump(exclude_none=True))
    return ModelOptions.model_construct(**found)  # (each entry was validated at start-up)


@dataclass(frozen=True)
class Plan:
    """One request's options, and how many tokens of prompt they leave room for."""

    options: Options
    window: int  # tokens the model reads: the prompt and the reply

    @property
    def prompt_tokens(self) -> int:
        """What the system prompt, the history and the new turn may use: the window less the
        reply's cap (at most half of it: a cap over the window still leaves the question)."""
        reserve = self.options.num_predict or 0
        return self.window - min(reserve, self.window // 2)


def plan(model: str, settings: Settings, info: ModelInfo) -> Plan:
    """The options for one reply of `model`.

    The window is the operator's `num_ctx` for the model if set, else the smaller of the
    model's trained context (an Ollama's /api/show) and PARLEY_CONTEXT_TOKENS; Ollama is sent it
    as `num_ctx`, so what Parley packs is what the model reads. Every reply is capped: the
    model's `num_predict`, else PARLEY_REPLY_RESERVE_TOKENS. PARLEY_THINK applies to models that
    say they think; a model's own `think` always applies.
    """
    chosen = configured(model, settings.model_options)
    window = settings.context_tokens
    if info.context_length is not None:
        window = min(window, info.context_length)
    window = chosen.num_ctx or window
    think: Think | None = chosen.think
    if think is None and settings.think is not None and "thinking" in info.capabilities:
        think = THINK.get(settings.think, settings.think)
    options = Options(
        temperature=chosen.temperature,
        top_p=chosen.top_p,
        num_ctx=window,
        num_predict=chosen.num_predict or settings.reply_reserve_tokens or None,
        stop=tuple(chosen.stop or ()),
        seed=chosen.seed,
        think=think,
        keep_alive=chosen.keep_alive,
    )
    return Plan(options, window)
