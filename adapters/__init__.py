"""Platform adapters: Slack, Discord and the console turn events into Turns and post replies."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from bot.app import Parley


class Adapter(Protocol):
    name: str

    @property
    def ready(self) -> bool:
        """Connected and taking events (for /readyz)."""
        ...

    async def start(self) -> None: ...

    async def quiesce(self) -> None:
        """Shutting down: take no more events where the platform can give them to another
        replica (replies in flight go on)."""
        ...

    async def stop(self) -> None: ...


def platform_adapters(parley: Parley) -> list[Adapter]:
    """Every platform adapter whose token is configured (imported only when needed)."""
    wanted = [
        ("adapters.slack", "SlackAdapter", parley.settings.slack_bot_token),
        ("adapters.discord", "DiscordAdapter", parley.settings.discord_token),
    ]
    adapters: list[Adapter] = []
    for module, name, token in wanted:
        if token is not None:  # import a platform's library only when it is used
            adapter: Adapter = getattr(importlib.import_module(module), name)(parley)
            adapters.append(adapter)
    return adapters
