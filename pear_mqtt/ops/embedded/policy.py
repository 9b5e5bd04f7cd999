"""The broker ACL evaluated in Python, with mosquitto's semantics (the embedded broker's)."""

from __future__ import annotations

from collections.abc import Iterable

from ...model.acl import AclRule, acl_rules, filter_covers, topic_matches
from ...model.topics import validate_identifier

__all__ = ["AccessPolicy"]


class AccessPolicy:
    """ACL rules evaluated with mosquitto's semantics for one authenticated username.

    ``pattern`` rules (``user`` None) apply to every user with ``%u`` replaced by the username;
    ``topic`` rules apply to their user only. A matching ``deny`` rule wins over any grant.
    """

    __slots__ = ("_by_user", "_rules")

    def __init__(self, rules: Iterable[AclRule]) -> None:
        self._rules = tuple(rules)
        self._by_user: dict[str, tuple[tuple[str, str], ...]] = {}

    @classmethod
    def for_network(cls, *, mode: str, network: str, bridge_users: Iterable[str] = (),
                    revoked: Iterable[tuple[str, str]] = ()) -> AccessPolicy:
        """The policy of a broker of ``mode`` (see :func:`pear_mqtt.model.acl.acl_rules`);
        ``revoked`` ``(member, node)`` pairs get the deny rules the mosquitto ACL has."""
        return cls(acl_rules(mode=mode, network=network, bridge_users=bridge_users,
                             revoked=revoked))

    @property
    def rules(self) -> tuple[AclRule, ...]:
        """The rules, before ``%u`` substitution."""
        return self._rules

    def rules_for(self, username: str) -> tuple[tuple[str, str], ...]:
        """``(access, filter)`` pairs that apply to ``username``, ``%u`` substituted."""
        cached = self._by_user.get(username)
        if cached is not None:
            return cached
        try:
            validate_identifier(username, what="username")
        except ValueError:
            # mosquitto refuses to substitute a username that would change the pattern's shape
            # (wildcards, separators); such a user gets no rights at all.
            resolved: tuple[tuple[str, str], ...] = ()
        else:
            resolved = tuple(
                (rule.access, rule.topic.replace("%u", username))
                for rule in self._rules
                if rule.user is None or rule.user == username
            )
        self._by_user[username] = resolved
        return resolved

    def _allowed(self, username: str, topic: str, grants: tuple[str, ...]) -> bool:
        rules = self.rules_for(username)
        if any(access == "deny" and topic_matches(f, topic) for access, f in rules):
            return False
        return any(access in grants and topic_matches(f, topic) for access, f in rules)

    def may_publish(self, *, username: str, topic: str) -> bool:
        """Whether ``username`` may publish to ``topic`` (a write or readwrite rule matches)."""
        return self._allowed(username, topic, ("write", "readwrite"))

    def may_read(self, *, username: str, topic: str) -> bool:
        """Whether a message on ``topic`` may be delivered to ``username``."""
        return self._allowed(username, topic, ("read", "readwrite"))

    def may_subscribe(self, *, username: str, topic_filter: str) -> bool:
        """Whether ``username`` may subscribe to ``topic_filter``.

        True when one read rule covers the whole filter and no deny rule covers all of it;
        a deny rule covering part of the filter is enforced per message by :meth:`may_read`.
        """
        rules = self.rules_for(username)
        if any(access == "deny" and filter_covers(f, topic_filter) for access, f in rules):
            return False
        return any(access in ("read", "readwrite") and filter_covers(f, topic_filter)
                   for access, f in rules)
