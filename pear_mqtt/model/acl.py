"""Who may publish and subscribe where: the broker ACL rules the topic scheme implies
(mosquitto's ACL file, the embedded broker's policy and EMQX's rules are all rendered from
:func:`acl_rules`), and MQTT topic filter matching (MQTT 4.7)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from ..errors import TopicError
from .topics import CONSORTIUM_AGGREGATES, MODES, PREFIX, TopicScheme, validate_identifier

__all__ = ["AclRule", "acl_rules", "filter_covers", "revoked_node_rules", "topic_matches"]


# -- filter matching ------------------------------------------------------------------------

def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether the MQTT filter ``topic_filter`` matches the topic name ``topic`` (MQTT 4.7).

    ``#`` matches the parent level too (``a/#`` matches ``a``); filters starting with a wildcard
    never match ``$`` topics. ``topic_filter`` is assumed well formed.
    """
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    levels, filter_levels = topic.split("/"), topic_filter.split("/")
    for i, level in enumerate(filter_levels):
        if level == "#":
            return True
        if i >= len(levels) or (level != "+" and level != levels[i]):
            return False
    return len(levels) == len(filter_levels)


def filter_covers(outer: str, inner: str) -> bool:
    """Whether every topic the filter ``inner`` can match is matched by the filter ``outer``.

    What a subscription check needs: ``pear/v1/x/#`` covers ``pear/v1/x/+/state/#``, but
    ``pear/v1/x/+`` does not cover ``pear/v1/x/#`` (which also matches ``pear/v1/x`` and
    deeper topics).
    """
    outer_levels, inner_levels = outer.split("/"), inner.split("/")
    dollar = inner_levels[0].startswith("$")
    for i, level in enumerate(outer_levels):
        if level == "#":
            return not (i == 0 and dollar)
        if i >= len(inner_levels) or inner_levels[i] == "#":
            return False
        if level == "+":
            if i == 0 and dollar:
                return False
            continue
        if level != inner_levels[i]:  # also refuses inner "+" under a literal outer level
            return False
    return len(inner_levels) == len(outer_levels)


# -- access control -----------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class AclRule:
    """One broker ACL line.

    ``user`` None makes it a pattern rule for every authenticated client, where ``%u`` stands
    for the MQTT username (the certificate CN, i.e. the member identity).
    """

    access: Literal["read", "write", "readwrite", "deny"]
    topic: str
    user: str | None = None

    def mosquitto(self) -> str:
        """The rule as a mosquitto ``acl_file`` line."""
        if self.user is None:
            return f"pattern {self.access} {self.topic}"
        return f"topic {self.access} {self.topic}"


def revoked_node_rules(*, mode: str, network: str = "default",
                       revoked: Iterable[tuple[str, str]]) -> list[AclRule]:
    """``deny`` rules that take the topics of revoked nodes away from their member.

    For each ``(member, node)`` in ``revoked``, the member's username (the certificate CN) is
    denied ``state/<node>/#``, ``nodes/<node>``, ``nodes/<node>/sync`` and
    ``nodes/<node>/checkpoint/#`` in its subtree.
    A deny is all-access in mosquitto, so:

    - nobody of the member can write there any more (a revoked node that is still connected
      cannot republish its state); its other nodes cannot read there either;
    - with mosquitto's ``check_retain_source true`` (rendered by :mod:`pear_mqtt.brokerconf`)
      a retained message is re-checked on delivery against its publisher's *write* access, so
      the node's retained state and presence stop reaching every subscriber, of every member,
      the moment the broker reloads the ACL.

    The rules are per node: the member's other stores keep their own topics. Public mode has
    no per-node topics (presence and contributions are per participant), so it gets no rules.
    """
    if mode not in MODES:
        raise TopicError(f"mode must be one of {MODES}, got {mode!r}")
    validate_identifier(network, what="network_id")
    rules: list[AclRule] = []
    for member, node in revoked:
        validate_identifier(member, what="revoked member")
        validate_identifier(node, what="revoked node")
        if mode == "public":
            continue
        scheme = TopicScheme(mode, network, member)
        rules += [
            AclRule("deny", f"{scheme.member_root}/state/{node}/#", user=member),
            AclRule("deny", scheme.presence(node), user=member),
            AclRule("deny", scheme.sync_marker(node), user=member),
            AclRule("deny", f"{scheme.presence(node)}/checkpoint/#", user=member),
        ]
    return list(dict.fromkeys(rules))


_CONSORTIUM_READ = ("+/insights/#", "+/state/#", "+/nodes/+", "+/nodes/+/checkpoint/+",
                    "+/nodes/+/log/head", "+/nodes/+/log/req", f"{CONSORTIUM_AGGREGATES}/#",
                    "state/bridge/receipts/#")


def acl_rules(*, mode: str, network: str = "default", bridge_users: Iterable[str] = (),
              revoked: Iterable[tuple[str, str]] = (),
              monitor_users: Iterable[str] = ()) -> list[AclRule]:
    """The ACL a broker of ``mode`` needs: each member writes only its own subtree.

    - private: a company reads and writes ``pear/v1/private/<itself>/#``.
    - consortium: members read the whole network, write only under their own identity;
      the ``bridge_users`` alone write the consortium's ``aggregates/`` (no member can be
      named ``aggregates``: :class:`TopicScheme` and the CA refuse it).
    - public: participants write their own ``contrib/`` and presence and read aggregates;
      the ``bridge_users`` alone write ``aggregates/`` and bridge state, and read ``contrib/``.
      The bridge's history log (docs/HISTORY.md): only bridge users write a ``log/head``;
      everyone reads heads, asks any identity's ``log/req`` (a bridge, the archive) and
      answers into any ``log/reply``, and reads only its own requests and replies.

    Bridge users also get read on the consortium/private trees (they aggregate them).
    ``monitor_users`` (operators' monitor certificates) read the broker's ``$SYS/broker/#``.

    ``revoked`` lists ``(member, node)`` pairs whose certificate was revoked (see
    :func:`pear_mqtt.pki.revoked_nodes`); their ``deny`` rules (:func:`revoked_node_rules`)
    come first. A deny wins over every grant in both mosquitto 2 and
    :class:`pear_mqtt.ops.embedded.policy.AccessPolicy`, so the order is for the reader.
    """
    if mode not in MODES:
        raise TopicError(f"mode must be one of {MODES}, got {mode!r}")
    validate_identifier(network, what="network_id")
    bridges = [validate_identifier(b, what="bridge user") for b in bridge_users]
    monitors = [validate_identifier(m, what="monitor user") for m in monitor_users]
    rules: list[AclRule] = revoked_node_rules(mode=mode, network=network, revoked=revoked)
    if mode == "private":
        rules.append(AclRule("readwrite", f"{PREFIX}/private/%u/#"))
        for b in bridges:
            rules.append(AclRule("read", f"{PREFIX}/private/#", user=b))
    elif mode == "consortium":
        root = f"{PREFIX}/consortium/{network}"
        # Members read everything of the network but one another's history-log replies
        # (those go only to the node that asked); they write their own subtree, and ask
        # other nodes for log entries and answer such requests in the asker's subtree.
        rules += [AclRule("read", f"{root}/{pattern}") for pattern in _CONSORTIUM_READ]
        rules += [AclRule("readwrite", f"{root}/%u/#"),
                  AclRule("write", f"{root}/+/nodes/+/log/req"),
                  AclRule("write", f"{root}/+/nodes/+/log/reply")]
        for b in bridges:
            rules += [AclRule("read", f"{root}/#", user=b),
                      AclRule("readwrite", f"{root}/{CONSORTIUM_AGGREGATES}/#", user=b),
                      AclRule("readwrite", f"{root}/state/bridge/receipts/#", user=b),
                      AclRule("readwrite", f"{root}/state/bridge/partials/#", user=b)]
    else:
        root = f"{PREFIX}/public/{network}"
        rules += [
            AclRule("write", f"{root}/contrib/%u/#"),
            AclRule("readwrite", f"{root}/nodes/%u"),
            AclRule("readwrite", f"{root}/nodes/%u/sync"),
            AclRule("read", f"{root}/aggregates/#"),
            AclRule("read", f"{root}/state/bridge/#"),
            AclRule("read", f"{root}/nodes/+/log/head"),
            AclRule("read", f"{root}/nodes/%u/log/req"),
            AclRule("read", f"{root}/nodes/%u/log/reply"),
            AclRule("write", f"{root}/nodes/+/log/req"),
            AclRule("write", f"{root}/nodes/+/log/reply"),
        ]
        for b in bridges:
            rules += [
                AclRule("readwrite", f"{root}/aggregates/#", user=b),
                AclRule("readwrite", f"{root}/state/bridge/#", user=b),
                AclRule("read", f"{root}/contrib/#", user=b),
                AclRule("readwrite", f"{root}/nodes/{b}/log/head", user=b),
            ]
    rules += [AclRule("read", "$SYS/broker/#", user=m) for m in monitors]
    return rules
