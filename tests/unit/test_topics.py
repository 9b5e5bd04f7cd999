"""Unit tests of pear_mqtt.model.topics' ACL rules for revoked nodes (``acl_rules(revoked=...)``).

The mosquitto side of the same rules is checked against a real broker in
``tests/integration/test_security.py``; here: the exact rules, their placement, their
validation, and what they mean under :class:`pear_mqtt.ops.embedded.policy.AccessPolicy`
(mosquitto's semantics: a deny wins over every grant).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pear_mqtt.errors import PKIError, TopicError
from pear_mqtt.model.acl import AclRule, acl_rules, filter_covers, revoked_node_rules, topic_matches
from pear_mqtt.model.topics import TopicScheme, parse_topic
from pear_mqtt.ops.embedded.policy import AccessPolicy
from pear_mqtt.security import pki as pkimod

pytestmark = pytest.mark.unit

NET = "grp"
CONSORTIUM = f"pear/v1/consortium/{NET}"


def test_no_revoked_nodes_leaves_the_rules_unchanged() -> None:
    for mode in ("private", "consortium", "public"):
        assert acl_rules(mode=mode, network=NET, bridge_users=["br"], revoked=()) == \
            acl_rules(mode=mode, network=NET, bridge_users=["br"])


def test_consortium_revoked_node_gets_deny_rules_first() -> None:
    base = acl_rules(mode="consortium", network=NET, bridge_users=["br"])
    rules = acl_rules(mode="consortium", network=NET, bridge_users=["br"],
                      revoked=[("acme", "store-9")])
    assert rules[:4] == [
        AclRule("deny", f"{CONSORTIUM}/acme/state/store-9/#", user="acme"),
        AclRule("deny", f"{CONSORTIUM}/acme/nodes/store-9", user="acme"),
        AclRule("deny", f"{CONSORTIUM}/acme/nodes/store-9/sync", user="acme"),
        AclRule("deny", f"{CONSORTIUM}/acme/nodes/store-9/checkpoint/#", user="acme"),
    ]
    assert rules[4:] == base
    assert [r.mosquitto() for r in rules[:4]] == [
        f"topic deny {CONSORTIUM}/acme/state/store-9/#",
        f"topic deny {CONSORTIUM}/acme/nodes/store-9",
        f"topic deny {CONSORTIUM}/acme/nodes/store-9/sync",
        f"topic deny {CONSORTIUM}/acme/nodes/store-9/checkpoint/#",
    ]


def test_deny_rules_cover_exactly_the_topics_the_scheme_builds_for_the_node() -> None:
    acme = TopicScheme("consortium", NET, "acme")
    denied = [r.topic for r in revoked_node_rules(mode="consortium", network=NET,
                                                  revoked=[("acme", "store-9")])]

    def hit(topic: str) -> bool:
        return any(topic_matches(f, topic) for f in denied)

    assert hit(acme.state("store-9", "dairy/milk"))
    assert hit(acme.presence("store-9"))
    assert hit(acme.sync_marker("store-9"))
    assert hit(acme.checkpoint("store-9", 0)) and hit(acme.checkpoint("store-9", 63))
    assert not hit(acme.checkpoint("store-1", 0))
    # Node-precise: siblings, prefixes of the node id and the member's insights stay.
    assert not hit(acme.state("store-1", "dairy/milk"))
    assert not hit(acme.state("store-90", "dairy/milk"))
    assert not hit(acme.presence("store-1"))
    assert not hit(acme.insights("dairy/milk"))
    assert not hit(TopicScheme("consortium", NET, "globex").state("store-9", "dairy"))


def test_private_revoked_node_rules() -> None:
    assert revoked_node_rules(mode="private", network=NET, revoked=[("acme", "s9")]) == [
        AclRule("deny", "pear/v1/private/acme/state/s9/#", user="acme"),
        AclRule("deny", "pear/v1/private/acme/nodes/s9", user="acme"),
        AclRule("deny", "pear/v1/private/acme/nodes/s9/sync", user="acme"),
        AclRule("deny", "pear/v1/private/acme/nodes/s9/checkpoint/#", user="acme"),
    ]


def test_public_mode_has_no_per_node_topics_to_deny() -> None:
    assert revoked_node_rules(mode="public", network=NET, revoked=[("acme", "s9")]) == []
    assert acl_rules(mode="public", network=NET, revoked=[("acme", "s9")]) == \
        acl_rules(mode="public", network=NET)


def test_several_and_repeated_revoked_nodes() -> None:
    rules = revoked_node_rules(mode="consortium", network=NET,
                               revoked=[("acme", "s9"), ("globex", "s2"), ("acme", "s9")])
    assert len(rules) == 8
    assert {r.user for r in rules} == {"acme", "globex"}
    assert all(r.access == "deny" for r in rules)
    assert all(r.topic.startswith(f"{CONSORTIUM}/{r.user}/") for r in rules)


@pytest.mark.parametrize("pair", [("acme", "store/9"), ("acme", "#"), ("ac+me", "s9"),
                                  ("", "s9"), ("acme", "")])
def test_revoked_identifiers_are_validated(pair: tuple[str, str]) -> None:
    # A wildcard or separator would turn one node's deny into a whole subtree's.
    for mode in ("private", "consortium", "public"):
        with pytest.raises(TopicError):
            acl_rules(mode=mode, network=NET, revoked=[pair])


def test_policy_with_revoked_node_semantics() -> None:
    policy = AccessPolicy.for_network(mode="consortium", network=NET, bridge_users=["br"],
                                      revoked=[("acme", "store-9")])
    acme = TopicScheme("consortium", NET, "acme")
    # The member loses the node's topics, for writing and reading...
    assert not policy.may_publish(username="acme", topic=acme.state("store-9", "dairy"))
    assert not policy.may_publish(username="acme", topic=acme.presence("store-9"))
    assert not policy.may_read(username="acme", topic=acme.state("store-9", "dairy"))
    # ...while its other nodes keep theirs, and subscribing to the state filter still works
    # (the hole is enforced per message).
    assert policy.may_publish(username="acme", topic=acme.state("store-1", "dairy"))
    assert policy.may_publish(username="acme", topic=acme.presence("store-1"))
    assert policy.may_publish(username="acme", topic=acme.insights("dairy"))
    assert policy.may_subscribe(username="acme", topic_filter=acme.state_filter())
    # Other members' rights are untouched (what hides the node's retained state from them is
    # the publisher's lost write access: mosquitto's check_retain_source).
    assert policy.may_read(username="globex", topic=acme.state("store-9", "dairy"))
    assert policy.may_read(username="br", topic=acme.state("store-9", "dairy"))


def test_checkpoint_topics_round_trip_and_stay_in_the_member_subtree() -> None:
    from pear_mqtt.model.topics import CHECKPOINT_PAGES, parse_topic

    for mode in ("consortium", "private"):
        acme = TopicScheme(mode, NET, "acme")
        topic = acme.checkpoint("store-9", 0x2a)
        assert topic == f"{acme.presence('store-9')}/checkpoint/2a"
        parsed = parse_topic(topic)
        assert (parsed.kind, parsed.company, parsed.node, parsed.page) == \
            ("checkpoint", "acme", "store-9", 0x2a)
        assert topic_matches(acme.checkpoint_filter(), topic)
        assert topic_matches(acme.node_checkpoint_filter("store-9"), topic)
        assert not topic_matches(acme.node_checkpoint_filter("store-1"), topic)
        assert topic.startswith(acme.member_root + "/")  # writable under "%u/#"
        assert not topic_matches(acme.presence_filter(), topic)
    with pytest.raises(TopicError):
        acme.checkpoint("store-9", CHECKPOINT_PAGES)
    for bad in ("100", "2A", "x", "002a", "g0"):
        with pytest.raises(TopicError):
            parse_topic(f"{acme.presence('store-9')}/checkpoint/{bad}")
    with pytest.raises(TopicError):
        TopicScheme("public", NET, "acme").checkpoint("acme", 0)



def test_checkpoint_part_topics_round_trip_at_the_page_level() -> None:
    from pear_mqtt.model.topics import CHECKPOINT_MAX_PARTS, checkpoint_slot

    for mode in ("consortium", "private"):
        acme = TopicScheme(mode, NET, "acme")
        assert acme.checkpoint("store-9", 0x2a, 0) == acme.checkpoint("store-9", 0x2a)
        for part in (1, 17, CHECKPOINT_MAX_PARTS - 1):
            topic = acme.checkpoint("store-9", 0x2a, part)
            assert topic == f"{acme.presence('store-9')}/checkpoint/2a.{part}"
            parsed = parse_topic(topic)
            assert (parsed.kind, parsed.company, parsed.node, parsed.page, parsed.part) == \
                ("checkpoint", "acme", "store-9", 0x2a, part)
            # The same level as a page: the page filters cover parts too.
            assert topic_matches(acme.checkpoint_filter(), topic)
            assert topic_matches(acme.node_checkpoint_filter("store-9"), topic)
            assert not topic_matches(acme.node_checkpoint_filter("store-1"), topic)
        assert parse_topic(acme.checkpoint("store-9", 0x2a)).part == 0
        for bad in (-1, CHECKPOINT_MAX_PARTS, True):
            with pytest.raises(TopicError):
                acme.checkpoint("store-9", 0x2a, bad)
        for leaf in ("2a.0", "2a.01", "2a.", ".1", "2a.x", "2a.1.1", "2A.1", "2a.+1",
                     f"2a.{CHECKPOINT_MAX_PARTS}", "2a.\u0661"):
            with pytest.raises(TopicError):
                parse_topic(f"{acme.presence('store-9')}/checkpoint/{leaf}")
    # What a head names a part by: the page itself for part 0 (as before parts).
    assert checkpoint_slot(0x2a, 0) == 0x2a and checkpoint_slot(0x2a, 1) == 0x12a


def test_policy_lets_a_node_write_and_members_read_its_part_topics() -> None:
    policy = AccessPolicy.for_network(mode="consortium", network=NET, bridge_users=["br"],
                                      revoked=[("acme", "store-9")])
    acme = TopicScheme("consortium", NET, "acme")
    part = acme.checkpoint("store-1", 0x2a, 3)
    assert policy.may_publish(username="acme", topic=part)
    assert policy.may_read(username="globex", topic=part)
    assert policy.may_subscribe(username="globex", topic_filter=acme.checkpoint_filter())
    assert not policy.may_publish(username="globex", topic=part)
    # A revoked node loses its parts as it loses its pages.
    assert not policy.may_publish(username="acme", topic=acme.checkpoint("store-9", 0x2a, 3))
    private = AccessPolicy.for_network(mode="private", network=NET)
    mine = TopicScheme("private", NET, "acme").checkpoint("store-1", 0, 2)
    assert private.may_publish(username="acme", topic=mine)
    assert not private.may_read(username="globex", topic=mine)


# -- the filter matcher ---------------------------------------------------------------------

@pytest.mark.parametrize(("topic_filter", "topic", "expected"), [
    ("a/b", "a/b", True),
    ("a/+", "a/b", True),
    ("a/+", "a/b/c", False),
    ("a/#", "a", True),
    ("a/#", "a/b/c", True),
    ("+/b", "a/b", True),
    ("#", "$SYS/x", False),
    ("+/x", "$SYS/x", False),
    ("$SYS/#", "$SYS/x", True),
    ("a/b", "a/c", False),
    ("a/b/c", "a/b", False),
])
def test_topic_matches(topic_filter: str, topic: str, expected: bool) -> None:
    assert topic_matches(topic_filter, topic) is expected


@pytest.mark.parametrize(("outer", "inner", "expected"), [
    ("a/#", "a/#", True),
    ("a/#", "a/+/c/#", True),
    ("a/#", "a", True),
    ("a/+", "a/b", True),
    ("a/+", "a/+", True),
    ("a/+", "a/#", False),
    ("a/b/#", "a/+/#", False),
    ("a/b", "a/+", False),
    ("a/+/c", "a/b/c/d", False),
    ("#", "$SYS/#", False),
    ("+/#", "$SYS/x", False),
    ("#", "a/b", True),
])
def test_filter_covers(outer: str, inner: str, expected: bool) -> None:
    assert filter_covers(outer, inner) is expected


def test_consortium_aggregates_topic_parse_and_acl() -> None:
    bridge = TopicScheme("consortium", NET, "br")
    topic = bridge.consortium_aggregate("insights/dairy")
    assert topic == f"{CONSORTIUM}/aggregates/insights/dairy"
    parsed = parse_topic(topic)
    assert (parsed.mode, parsed.network, parsed.company, parsed.kind, parsed.category) == (
        "consortium", NET, None, "aggregates", "insights/dairy")
    acme = TopicScheme("consortium", NET, "acme")
    assert acme.aggregates_filter() == f"{CONSORTIUM}/aggregates/#"
    assert topic_matches(acme.aggregates_filter(), topic)
    assert TopicScheme("public", NET, "p1").aggregates_filter() == \
        "pear/v1/public/grp/aggregates/#"
    with pytest.raises(TopicError):
        TopicScheme("private", NET, "acme").aggregates_filter()
    # nobody may be the member "aggregates" in a consortium, so no member's subtree is it
    with pytest.raises(TopicError, match="reserved"):
        TopicScheme("consortium", NET, "aggregates")
    policy = AccessPolicy.for_network(mode="consortium", network=NET, bridge_users=["br"])
    assert policy.may_publish(username="br", topic=topic)
    assert not policy.may_publish(username="acme", topic=topic)
    assert policy.may_read(username="acme", topic=topic)
    assert policy.may_subscribe(username="acme", topic_filter=acme.aggregates_filter())
    # the bridge still writes nothing else of the members'
    assert not policy.may_publish(username="br", topic=acme.insights("dairy"))


def test_consortium_receipts_topic_parse_and_acl() -> None:
    bridge = TopicScheme("consortium", NET, "br")
    topic = bridge.consortium_receipt("insights/dairy")
    assert topic == f"{CONSORTIUM}/state/bridge/receipts/insights/dairy"
    parsed = parse_topic(topic)
    assert (parsed.mode, parsed.network, parsed.company, parsed.kind, parsed.category) == (
        "consortium", NET, None, "bridge_receipt", "insights/dairy")
    # "state" is reserved like "aggregates": nothing else under it is a member's topic
    with pytest.raises(TopicError, match="reserved"):
        TopicScheme("consortium", NET, "state")
    for other in (f"{CONSORTIUM}/state/insights/dairy", f"{CONSORTIUM}/state/bridge/ledger"):
        with pytest.raises(TopicError):
            parse_topic(other)
    policy = AccessPolicy.for_network(mode="consortium", network=NET, bridge_users=["br"])
    acme = TopicScheme("consortium", NET, "acme")
    assert policy.may_publish(username="br", topic=topic)
    assert not policy.may_publish(username="acme", topic=topic)
    assert policy.may_read(username="acme", topic=topic)
    assert not policy.may_publish(username="br", topic=f"{CONSORTIUM}/state/other")
    assert topic_matches(f"{CONSORTIUM}/#", topic) and not topic_matches(acme.live_filter(),
                                                                          topic)


@pytest.mark.parametrize("name", ["aggregates", "state"])
def test_ca_refuses_the_reserved_member_name(tmp_path: Path, name: str) -> None:
    pkimod.create_ca(directory=tmp_path / "ca", network=NET)
    with pytest.raises(PKIError, match="reserved"):
        pkimod.issue(ca_dir=tmp_path / "ca", out_dir=tmp_path / "out", role="node",
                     member=name, node="store-1")


def test_public_log_topics_of_the_bridge_parse_and_acl() -> None:
    """The bridge's history log on the public broker (docs/HISTORY.md, "The bridge's log"):
    only a bridge user writes its head; participants read it and ask for entries; answers
    reach only the participant that asked."""
    bridge, p1 = TopicScheme("public", NET, "br"), TopicScheme("public", NET, "p1")
    head, req, reply = bridge.log_head("bridge"), bridge.log_request("bridge"), \
        p1.log_reply("store-1")
    assert head == f"pear/v1/public/{NET}/nodes/br/log/head"
    assert reply == f"pear/v1/public/{NET}/nodes/p1/log/reply"
    for topic, kind, member in ((head, "log_head", "br"), (req, "log_req", "br"),
                                (reply, "log_reply", "p1")):
        parsed = parse_topic(topic)
        # public topics name no node: the identity checks compare the member alone
        assert (parsed.mode, parsed.company, parsed.kind, parsed.node) == (
            "public", member, kind, None)
    assert topic_matches(p1.log_head_filter(), head)
    policy = AccessPolicy.for_network(mode="public", network=NET, bridge_users=["br"])
    assert policy.may_publish(username="br", topic=head)
    assert not policy.may_publish(username="p1", topic=head)
    assert not policy.may_publish(username="p1", topic=p1.log_head("store-1"))
    assert policy.may_subscribe(username="p1", topic_filter=p1.log_head_filter())
    assert policy.may_publish(username="p1", topic=req)
    assert policy.may_read(username="br", topic=req) and not policy.may_read(username="p1",
                                                                               topic=req)
    assert policy.may_publish(username="br", topic=reply)
    assert policy.may_read(username="p1", topic=reply)
    assert not policy.may_read(username="p2", topic=reply)
    assert policy.may_subscribe(username="p1", topic_filter=p1.bridge_receipts_filter())
