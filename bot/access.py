"""Who may use Parley where, and who may change a channel's model and prompt — one set of rules
for every platform, from each platform's settings. Pure: tested directly.

Adapters gather the facts (who asks, with which roles, in which space and channel) and ask these
rules; the core asks them again before it answers or runs a command.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from bot.settings import Settings

NOT_ALLOWED = "Parley isn't enabled for you here."
CONFIGURE_ADMINS = "Only server administrators can change the model or the prompt here."
CONFIGURE_ROLE = (
    "Only administrators and members with the <@&{role}> role can change the model or the "
    "prompt here."
)
CONFIGURE_LISTED = (
    "Only workspace admins and the people Parley's operator named can change the model or the "
    "prompt here."
)


@dataclass(frozen=True)
class Asker:
    """Who asks and where, as the rules read it."""

    user_id: str
    space: str  # Slack team, Discord guild ("" in a DM)
    channel: str  # the home channel: a thread counts as its parent channel
    in_dm: bool = False
    roles: frozenset[str] = frozenset()  # Discord role ids
    is_admin: bool = False  # Discord administrator, Slack workspace admin or owner


@dataclass(frozen=True)
class Access:
    """An operator's allowlists (empty ones allow everyone) and the rule for configuring."""

    spaces: frozenset[str] = frozenset()
    channels: frozenset[str] = frozenset()
    roles: frozenset[str] = frozenset()
    users: frozenset[str] = frozenset()
    configure_role: str | None = None  # Discord: this role (and admins) may configure
    configure_admins_only: bool = False
    configurers: frozenset[str] = frozenset()  # Slack: these people (and workspace admins)

    @classmethod
    def for_platform(cls, settings: Settings, platform: str) -> Access:
        match platform:
            case "discord":
                role = settings.discord_model_role
                return cls(
                    spaces=_ids(settings.discord_allowed_guilds),
                    channels=_ids(settings.discord_allowed_channels),
                    roles=_ids(settings.discord_allowed_roles),
                    users=_ids(settings.discord_allowed_users),
                    configure_role=str(role) if role is not None else None,
                    configure_admins_only=settings.discord_model_admin_only,
                )
            case "slack":
                return cls(
                    channels=frozenset(settings.slack_allowed_channels),
                    users=frozenset(settings.slack_allowed_users),
                    configurers=frozenset(settings.slack_model_admins),
                )
            case _:
                return cls()

    def may_use(self, asker: Asker) -> bool:
        """Whether this person may talk to Parley here.

        Who: with a user or role allowlist, the person must be listed or hold a listed role.
        Where: with a space or channel allowlist, the message must be in a listed one (a thread
        counts as its parent channel). A DM is outside every space and channel, so with either
        of those lists set only people on the user allowlist may use DMs.
        """
        listed = asker.user_id in self.users
        if (self.users or self.roles) and not (listed or not self.roles.isdisjoint(asker.roles)):
            return False
        if asker.in_dm:
            return listed or not (self.spaces or self.channels)
        if self.spaces and asker.space not in self.spaces:
            return False
        return not self.channels or asker.channel in self.channels

    def may_configure(self, asker: Asker) -> bool:
        """Whether this person may change the model or the prompt here (a DM's are its own
        person's affair; administrators always may)."""
        if asker.in_dm or asker.is_admin:
            return True
        if self.configurers:
            return asker.user_id in self.configurers
        if self.configure_admins_only:
            return False
        if self.configure_role is not None:
            return self.configure_role in asker.roles
        return True

    def configure_refusal(self) -> str:
        if self.configurers:
            return CONFIGURE_LISTED
        if self.configure_role is not None and not self.configure_admins_only:
            return CONFIGURE_ROLE.format(role=self.configure_role)
        return CONFIGURE_ADMINS


def _ids(values: Iterable[int]) -> frozenset[str]:
    return frozenset(str(v) for v in values)
