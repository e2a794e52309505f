"""Who may use Parley where, and who may change a channel's model and prompt: one set of rules
for every platform (bot/access.py), called directly."""

from __future__ import annotations

import pytest

from bot.access import CONFIGURE_ADMINS, CONFIGURE_LISTED, Access, Asker
from bot.settings import Settings

GUILD, CHANNEL = "1", "10"
IN_CHANNEL = Asker("7", GUILD, CHANNEL)
IN_DM = Asker("7", "", "30", in_dm=True)


def test_without_allowlists_everyone_may_use_parley_everywhere() -> None:
    for asker in (IN_CHANNEL, IN_DM):
        assert Access().may_use(asker)


def test_user_and_role_allowlists_admit_listed_people_or_role_holders() -> None:
    access = Access(users=frozenset({"7"}), roles=frozenset({"70"}))
    assert access.may_use(IN_CHANNEL)
    assert access.may_use(Asker("8", GUILD, CHANNEL, roles=frozenset({"70"})))
    assert not access.may_use(Asker("8", GUILD, CHANNEL, roles=frozenset({"71"})))


def test_a_channel_allowlist_covers_threads_and_a_space_allowlist_other_spaces() -> None:
    # a thread is asked about as its parent (home) channel
    assert Access(channels=frozenset({CHANNEL})).may_use(IN_CHANNEL)
    assert not Access(channels=frozenset({CHANNEL})).may_use(Asker("7", GUILD, "11"))
    assert not Access(spaces=frozenset({GUILD})).may_use(Asker("7", "2", CHANNEL))


def test_dms_with_where_allowlists_are_for_listed_people_only() -> None:
    assert not Access(spaces=frozenset({GUILD})).may_use(IN_DM)
    assert Access(spaces=frozenset({GUILD}), users=frozenset({"7"})).may_use(IN_DM)


def test_configuring_is_open_unless_restricted_and_a_dm_is_its_persons_own() -> None:
    assert Access().may_configure(IN_CHANNEL)
    admins_only = Access(configure_admins_only=True, configure_role="70")
    assert admins_only.may_configure(Asker("7", GUILD, CHANNEL, is_admin=True))
    assert not admins_only.may_configure(Asker("7", GUILD, CHANNEL, roles=frozenset({"70"})))
    assert admins_only.configure_refusal() == CONFIGURE_ADMINS
    assert admins_only.may_configure(IN_DM)


def test_a_role_or_administrators_may_configure() -> None:
    access = Access(configure_role="70")
    assert access.may_configure(Asker("7", GUILD, CHANNEL, roles=frozenset({"70"})))
    assert not access.may_configure(Asker("7", GUILD, CHANNEL, roles=frozenset({"71"})))
    assert "<@&70>" in access.configure_refusal()


@pytest.mark.parametrize(
    ("env", "asker", "uses", "configures"),
    [
        ({}, Asker("U1", "T1", "C1"), True, True),
        ({"slack_allowed_channels": "C1, C2"}, Asker("U1", "T1", "C3"), False, True),
        ({"slack_allowed_users": "U2"}, Asker("U1", "T1", "C1"), False, True),
        ({"slack_allowed_users": "U2"}, Asker("U2", "T1", "C1"), True, True),
        ({"slack_model_admins": "U2"}, Asker("U1", "T1", "C1"), True, False),
        ({"slack_model_admins": "U2"}, Asker("U2", "T1", "C1"), True, True),
        ({"slack_model_admins": "U2"}, Asker("U1", "T1", "C1", is_admin=True), True, True),
        ({"slack_allowed_channels": "C1"}, Asker("U1", "", "D1", in_dm=True), False, True),
    ],
)
def test_slacks_allowlists_mirror_discords(
    env: dict[str, str], asker: Asker, uses: bool, configures: bool
) -> None:
    access = Access.for_platform(Settings(_env_file=None, **env), "slack")  # type: ignore[arg-type]
    assert access.may_use(asker) is uses
    assert access.may_configure(asker) is configures
    if env.get("slack_model_admins"):
        assert access.configure_refusal() == CONFIGURE_LISTED


def test_a_slack_id_list_with_something_else_in_it_is_refused_with_its_name() -> None:
    with pytest.raises(ValueError, match="is not a Slack id"):
        Settings(_env_file=None, slack_allowed_users="U1, alice")  # type: ignore[call-arg]
