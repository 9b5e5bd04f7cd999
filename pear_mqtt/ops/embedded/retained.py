"""Retained messages in the embedded broker: who published each, and who may be sent it.

:class:`PearBroker` is the one place that overrides a private amqtt method. amqtt delivers
retained messages without asking the topic plugins (so ``deny`` rules and revoked publishers
would not apply), and when a client connects it replays the retained messages of *every*
filter any client subscribed to; no plugin hook or event can change either.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Final

from amqtt.broker import Broker

from ...model.acl import topic_matches
from .admission import Gatekeeper, Principal, principal_of

__all__ = ["OVERRIDDEN", "PearBroker", "RetainedSources"]

log = logging.getLogger(__name__)

OVERRIDDEN: Final = ("_publish_retained_messages_for_subscription",)
"""The private amqtt ``Broker`` methods :class:`PearBroker` replaces (checked at start)."""


class RetainedSources:
    """The principal that published each retained message, as it was when the message was
    stored (a session's principal changes when another node of its member resumes it)."""

    def __init__(self) -> None:
        self._by_topic: dict[str, tuple[Any, Principal | None]] = {}

    def record(self, message: Any) -> Principal | None:
        """Note who published ``message`` (an amqtt retained message); return it."""
        source = principal_of(message.source_session)
        self._by_topic[message.topic] = (message, source)
        return source

    def forget(self, message: Any) -> None:
        """``message`` was cleared (an empty retained payload replaced it)."""
        entry = self._by_topic.get(message.topic)
        if entry is not None and entry[0] is message:
            del self._by_topic[message.topic]

    def source(self, message: Any) -> Principal | None:
        """Who published ``message``; its session's principal while not yet recorded."""
        entry = self._by_topic.get(message.topic)
        if entry is not None and entry[0] is message:
            return entry[1]
        return principal_of(message.source_session)

    def drop(self, retained: dict[str, Any], revoked: frozenset[int]) -> int:
        """Delete from ``retained`` the messages of the ``revoked`` serials; return how many."""
        gone = [topic for topic, (_, source) in self._by_topic.items()
                if source is not None and source.revoked_by(revoked)]
        for topic in gone:
            message, _ = self._by_topic.pop(topic)
            if retained.get(topic) is message:
                del retained[topic]
        return len(gone)


class PearBroker(Broker):  # type: ignore[misc]  # amqtt is untyped
    """amqtt's broker, sending retained messages only to sessions that subscribed to them and
    may read them, and never those of a revoked publisher."""

    def __init__(self, config: dict[str, Any], *, gatekeeper: Gatekeeper,
                 sources: RetainedSources) -> None:
        super().__init__(config)
        self._pear_gate = gatekeeper
        self._pear_sources = sources

    async def _publish_retained_messages_for_subscription(self, subscription: tuple[str, int],
                                                          session: Any) -> None:
        topic_filter, qos = subscription
        # amqtt calls this for every filter of every client when a session connects; only the
        # session's own subscriptions may bring it retained messages.
        subscribers = self.subscriptions.get(topic_filter, ())
        if not any(s.client_id == session.client_id for s, _ in subscribers):
            return
        _, handler = self.sessions.get(session.client_id, (None, None))
        principal = principal_of(session)
        if handler is None or principal is None or principal.revoked:
            return
        sends = [
            asyncio.ensure_future(handler.mqtt_publish(
                topic, message.data, min(qos, message.qos or qos), retain=True))
            for topic, message in list(self.retained_messages.items())
            if topic_matches(topic_filter, topic) and self._may_send(principal, topic, message)
        ]
        if sends:
            await asyncio.wait(sends)

    def _may_send(self, reader: Principal, topic: str, message: Any) -> bool:
        gate = self._pear_gate
        username = reader.username
        if username is not None and not gate.policy.may_read(username=username, topic=topic):
            return False
        source = self._pear_sources.source(message)
        # reload_crl already dropped these; checking again costs one set lookup.
        return source is None or not source.revoked_by(gate.revoked)
