"""The amqtt plugin of the embedded broker: authentication, topic ACL, retained sources."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin

from .admission import CONNECTING, Gatekeeper, attach, principal_of
from .retained import RetainedSources

__all__ = ["PearPlugin", "plugin_config"]

log = logging.getLogger(__name__)


def plugin_config(*, gatekeeper: Gatekeeper, sources: RetainedSources) -> dict[str, Any]:
    """The ``plugins`` entry of an amqtt broker configuration that installs this plugin."""
    return {f"{__name__}.{PearPlugin.__name__}": {"gate": gatekeeper, "sources": sources}}


class PearPlugin(BaseAuthPlugin, BaseTopicPlugin):  # type: ignore[misc]  # amqtt is untyped
    """Admits what the listeners admitted and confines it to the ACL."""

    @dataclass
    class Config:
        """Shared with the broker that configured the plugin (amqtt passes objects through)."""

        gate: Any
        sources: Any

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self._gate: Gatekeeper = self.config.gate
        self._sources: RetainedSources = self.config.sources

    async def authenticate(self, *, session: Any) -> bool:
        # The listener screened this connection's CONNECT and left its verdict in the
        # connection's context; a session that did not come through it gets nothing.
        admission = CONNECTING.get()
        if admission is None:
            return False
        attach(session, admission)
        return True

    async def on_broker_client_connected(self, *, client_id: str, client_session: Any) -> None:
        # amqtt has registered the session under its client id: the next CONNECT with that id
        # may now be screened (it will find this session and its owner).
        admission = CONNECTING.get()
        if admission is not None:
            admission.release()

    async def topic_filtering(self, *, session: Any = None, topic: str | None = None,
                              action: Any = None) -> bool:
        principal = principal_of(session)
        if principal is None or not topic:
            return False
        if principal.revoked:  # connected before reload_crl revoked its certificate
            log.debug("refused %s on %r for %s: its certificate is revoked",
                      getattr(action, "value", action), topic, principal)
            return False
        username = principal.username
        if username is None:
            return True  # anonymous plain-listener client: development mode, no ACL
        policy = self._gate.policy
        if action == Action.PUBLISH:
            return policy.may_publish(username=username, topic=topic)
        if action == Action.SUBSCRIBE:
            return policy.may_subscribe(username=username, topic_filter=topic)
        if action == Action.RECEIVE:
            return policy.may_read(username=username, topic=topic)
        return False

    async def on_broker_retained_message(self, *, client_id: str | None,
                                         retained_message: Any) -> None:
        if client_id is not None:
            return  # a message queued for an offline session, not a retained one
        if not retained_message.data:
            self._sources.forget(retained_message)
            return
        source = self._sources.record(retained_message)
        if source is not None and source.revoked_by(self._gate.revoked):
            # E.g. the last will of a connection whose certificate was revoked meanwhile.
            log.info("not retaining %r from %s: its certificate is revoked",
                     retained_message.topic, source)
            self._sources.drop(self.context.retained_messages, self._gate.revoked)
