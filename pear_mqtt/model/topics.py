"""The topic scheme: the only module that builds or parses pear_mqtt topic strings (the
broker rules that follow from it are in :mod:`.acl`).

::

    pear/v1/private/<company>/insights/<category path>             live insights
    pear/v1/private/<company>/insights/$mixed                      live, several categories
    pear/v1/private/<company>/state/<node>/<category path>         retained latest state
    pear/v1/private/<company>/nodes/<node>                         retained presence (+ will)
    pear/v1/private/<company>/nodes/<node>/sync                    sync end-of-burst marker
    pear/v1/private/<company>/nodes/<node>/checkpoint/<page>[.<part>]  retained state checkpoint
    pear/v1/consortium/<network>/<company>/insights/<category path>
    pear/v1/consortium/<network>/<company>/state/<node>/<category path>
    pear/v1/consortium/<network>/<company>/nodes/<node>[/sync|/checkpoint/<page>[.<part>]]
    pear/v1/consortium/<network>/aggregates/<category path>        retained, bridge only
    pear/v1/consortium/<network>/state/bridge/receipts/<category path>   their receipts
    pear/v1/consortium/<network>/state/bridge/partials/<bridge>/<window>/<instance>/<part>
                                                                   scale-out, bridges only
    pear/v1/public/<network>/aggregates/<category path>            retained, bridge only
    pear/v1/public/<network>/contrib/<participant>/<category path> bridge reads only
    pear/v1/public/<network>/contrib/<participant>/$mixed          (several categories)
    pear/v1/public/<network>/nodes/<participant>[/sync]
    pear/v1/public/<network>/nodes/<identity>/log/{head,req,reply}   the bridge's history log
    pear/v1/public/<network>/state/bridge/<name>                   bridge ledger (retained)
    pear/v1/public/<network>/state/bridge/receipts/<category path> disclosure receipts (retained)

``<company>`` is the member identity the broker authenticates (the node certificate's CN, see
:mod:`pear_mqtt.pki`): the real company id, or its network pseudonym where the mode
anonymises; ``aggregates`` and ``state`` are reserved (the bridge's consortium aggregates
and their receipts use those levels), so no member may be named so. The state topic carries
the node so that every store of a company keeps its own retained state; DESIGN.md's
``state/<category path>`` would let stores overwrite each other. ``$mixed`` (a level no
category can have: levels never start with ``$``) carries one envelope of small batches of
several categories, each item's category named in its body (docs/DESIGN.md, Batching).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..errors import TopicError

__all__ = [
    "CHECKPOINT_MAX_PARTS",
    "CHECKPOINT_PAGES",
    "CONSORTIUM_AGGREGATES",
    "CONSORTIUM_RESERVED",
    "MAX_CATEGORY_DEPTH",
    "MAX_IDENTIFIER_LENGTH",
    "MIXED",
    "MODES",
    "PREFIX",
    "ParsedTopic",
    "PartialTopic",
    "TopicScheme",
    "checkpoint_slot",
    "parse_partial_topic",
    "parse_topic",
    "validate_category",
    "validate_identifier",
]

PREFIX = "pear/v1"
MAX_IDENTIFIER_LENGTH = 64
MAX_CATEGORY_DEPTH = 8

MIXED = "$mixed"
"""The last level of a live topic whose envelope holds insights of several categories."""

MODES = ("private", "consortium", "public")
"""The network modes a topic can be under."""

CONSORTIUM_AGGREGATES = "aggregates"
"""The level under a consortium network where the bridge's aggregates live: where members
have their identities, so no member may be named so (:class:`TopicScheme` refuses it)."""

CONSORTIUM_RESERVED: frozenset[str] = frozenset({CONSORTIUM_AGGREGATES, "state"})
"""Every level under a consortium network the bridge uses (aggregates; ``state/bridge/`` for
their receipts): no member may be named like one."""

Kind = Literal["insights", "state", "nodes", "sync", "checkpoint", "aggregates", "contrib",
               "bridge_state", "bridge_receipt", "bridge_partial", "log_head", "log_req",
               "log_reply"]

#: Pages a node's state checkpoint is split into (state topic -> page by CRC-32 of the topic).
#: 256 keeps a page of a node with 100,000 states near 250 kB, well inside one message.
CHECKPOINT_PAGES = 256

#: Parts a page may be cut into when it outgrows one message (part 0 is the page's own topic).
CHECKPOINT_MAX_PARTS = 65_536


def checkpoint_slot(page: int, part: int) -> int:
    """The number a node's signed head names part ``part`` of checkpoint page ``page`` by:
    the page itself for part 0 (as before pages had parts), ``part * 256 + page`` after."""
    return part * CHECKPOINT_PAGES + page


# Strings already found valid. Validity depends on the string alone, and a node checks the
# same few ids and categories for every insight (each ~15 times on the way out), so a bounded
# memo of successes saves most of that work; failures are always checked afresh.
_VALID_IDENTIFIERS: set[str] = set()
_VALID_CATEGORIES: set[str] = set()
_MEMO_LIMIT = 65_536
_PAGE_NAMES = {f"{i:02x}": i for i in range(CHECKPOINT_PAGES)}


def _remember(memo: set[str], value: str) -> None:
    # Full, it starts afresh rather than stop learning: a producer going through more
    # categories than it holds (a nightly state of 100,000 SKUs) checks each one a few times
    # in a row, and those repeats are what the memo saves.
    if len(memo) >= _MEMO_LIMIT:
        memo.clear()
    memo.add(value)


def validate_identifier(value: object, *, what: str = "identifier") -> str:
    """Return ``value`` if it may stand as one topic level, else raise :class:`TopicError`.

    ``what`` names the field in the message (``company_id``, ``node_id`` ...).
    """
    if type(value) is str and value in _VALID_IDENTIFIERS:
        return value
    if not isinstance(value, str):
        raise TopicError(f"{what} must be a string, got {type(value).__name__}")
    if value == "":
        raise TopicError(f"{what} must not be empty")
    if len(value) > MAX_IDENTIFIER_LENGTH:
        raise TopicError(
            f"{what} is {len(value)} characters long; at most {MAX_IDENTIFIER_LENGTH} are allowed"
        )
    if value.startswith("$"):
        raise TopicError(f"{what} {value!r} must not start with '$' (reserved for broker topics)")
    for bad, name in (("+", "'+' (MQTT wildcard)"), ("#", "'#' (MQTT wildcard)"),
                      ("/", "'/' (topic level separator)"), ("\x00", "NUL")):
        if bad in value:
            raise TopicError(f"{what} {value!r} must not contain {name}")
    if not value.isprintable() or value != value.strip():
        raise TopicError(
            f"{what} {value!r} must be printable, without control characters or surrounding "
            "white space"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise TopicError(f"{what} {value!r} is not valid UTF-8") from exc
    if type(value) is str:
        _remember(_VALID_IDENTIFIERS, value)
    return value


def validate_category(value: object, *, what: str = "category") -> str:
    """Validate a category path such as ``grocery/dairy/milk`` (1 to 8 levels)."""
    if type(value) is str and value in _VALID_CATEGORIES:
        return value
    if not isinstance(value, str):
        raise TopicError(f"{what} must be a string, got {type(value).__name__}")
    levels = value.split("/")
    if len(levels) > MAX_CATEGORY_DEPTH:
        raise TopicError(f"{what} {value!r} has {len(levels)} levels; at most "
                         f"{MAX_CATEGORY_DEPTH} are allowed")
    for level in levels:
        validate_identifier(level, what=f"{what} level")
    if type(value) is str:
        _remember(_VALID_CATEGORIES, value)
    return value


@dataclass(frozen=True, slots=True)
class ParsedTopic:
    """What a pear_mqtt topic says. ``company`` is None on public topics; ``category`` is
    None on a live topic of several categories (:data:`MIXED`)."""

    mode: str
    network: str | None
    company: str | None
    kind: Kind
    node: str | None = None
    category: str | None = None
    page: int | None = None
    part: int = 0


@dataclass(frozen=True, slots=True)
class TopicScheme:
    """Topic builder bound to one member of one network.

    ``network`` is ignored in private mode (a private broker serves one company).
    ``member`` is the company identity as the broker knows it (or the participant in public
    mode).
    """

    mode: str
    network: str
    member: str
    # Every topic starts with one of the two roots: built once, as the scheme is frozen.
    _network_root: str = field(init=False, repr=False, compare=False)
    _member_root: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise TopicError(f"mode must be one of {MODES}, got {self.mode!r}")
        validate_identifier(self.network, what="network_id")
        validate_identifier(self.member, what="company_id")
        if self.mode == "consortium" and self.member in CONSORTIUM_RESERVED:
            raise TopicError(f"{self.member!r} is reserved in consortium topics (the bridge's "
                             "aggregates and receipts); no member may be named so")
        if self.mode == "private":
            network_root = member_root = f"{PREFIX}/private/{self.member}"
        else:
            network_root = f"{PREFIX}/{self.mode}/{self.network}"
            member_root = (f"{network_root}/{self.member}" if self.mode == "consortium"
                           else f"{network_root}/contrib/{self.member}")
        object.__setattr__(self, "_network_root", network_root)
        object.__setattr__(self, "_member_root", member_root)

    # -- scopes ---------------------------------------------------------------------------
    @property
    def network_root(self) -> str:
        """Everything of this network on its broker."""
        return self._network_root

    @property
    def member_root(self) -> str:
        """This member's own subtree (where it may write)."""
        return self._member_root

    # -- builders -------------------------------------------------------------------------
    def insights(self, category: str) -> str:
        """Live insights of this member for ``category``."""
        validate_category(category)
        if self.mode == "public":
            return f"{self.member_root}/{category}"
        return f"{self.member_root}/insights/{category}"

    def live_and_state(self, node: str, category: str) -> tuple[str, str | None]:
        """:meth:`insights` and :meth:`state` of ``node`` for ``category`` (None in public
        mode), built together: a producer needs both for every new category."""
        validate_category(category)
        root = self.member_root
        if self.mode == "public":
            return f"{root}/{category}", None
        validate_identifier(node, what="node_id")
        return f"{root}/insights/{category}", f"{root}/state/{node}/{category}"

    def mixed_insights(self) -> str:
        """Live insights of this member, of several categories in one envelope."""
        if self.mode == "public":
            return f"{self.member_root}/{MIXED}"
        return f"{self.member_root}/insights/{MIXED}"

    def state(self, node: str, category: str) -> str:
        """Retained latest state of ``node`` for ``category``."""
        validate_identifier(node, what="node_id")
        validate_category(category)
        if self.mode == "public":
            raise TopicError("public participants keep no state topics; the bridge does")
        return f"{self.member_root}/state/{node}/{category}"

    def presence(self, node: str) -> str:
        """Retained presence of ``node``; the last will clears it."""
        validate_identifier(node, what="node_id")
        if self.mode == "public":
            return f"{self.network_root}/nodes/{self.member}"
        return f"{self.member_root}/nodes/{node}"

    def sync_marker(self, node: str) -> str:
        """A topic only ``node`` uses, to mark the end of a retained burst."""
        return f"{self.presence(node)}/sync"

    def category_of_state(self, node: str, topic: str) -> str:
        """The category of ``node``'s state ``topic`` (as :meth:`state` built it)."""
        prefix = f"{self.member_root}/state/{node}/"
        if not topic.startswith(prefix):
            raise TopicError(f"topic {topic!r} is not a state topic of node {node!r}")
        return validate_category(topic[len(prefix):])

    def node_state_filter(self, node: str) -> str:
        """Filter for the retained states of this member's ``node``."""
        validate_identifier(node, what="node_id")
        if self.mode == "public":
            raise TopicError("public participants keep no state topics; the bridge does")
        return f"{self.member_root}/state/{node}/#"

    def checkpoint(self, node: str, page: int, part: int = 0) -> str:
        """Retained checkpoint page ``page`` of ``node``'s states, or part ``part`` of it
        when it is cut into parts (``<page>.<part>``, the same topic level, so the filters
        and ACL rules of pages cover parts); private and consortium modes only."""
        if self.mode == "public":
            raise TopicError("public participants keep no state, so no checkpoints")
        if isinstance(page, bool) or not isinstance(page, int) \
                or not 0 <= page < CHECKPOINT_PAGES:
            raise TopicError(f"checkpoint page must be in [0, {CHECKPOINT_PAGES}), got {page!r}")
        if isinstance(part, bool) or not isinstance(part, int) \
                or not 0 <= part < CHECKPOINT_MAX_PARTS:
            raise TopicError(f"checkpoint part must be in [0, {CHECKPOINT_MAX_PARTS}), "
                             f"got {part!r}")
        if part:
            return f"{self.presence(node)}/checkpoint/{page:02x}.{part}"
        return f"{self.presence(node)}/checkpoint/{page:02x}"

    def node_checkpoint_filter(self, node: str) -> str:
        """Filter for the checkpoint pages of this member's ``node``."""
        if self.mode == "public":
            raise TopicError("public participants keep no state, so no checkpoints")
        return f"{self.presence(node)}/checkpoint/+"

    def log_head(self, node: str) -> str:
        """Retained signed head of ``node``'s history log. In public mode the level is the
        member alone (public topics name no node): the bridge's log, and the reply topic of a
        participant that asks for it."""
        return self._log(node, "head")

    def log_request(self, node: str) -> str:
        """Where others ask ``node`` for entries of its history log."""
        return self._log(node, "req")

    def log_reply(self, node: str) -> str:
        """Where ``node`` (of this member) receives the entries it asked for: only it reads
        them (docs/HISTORY.md)."""
        return self._log(node, "reply")

    def _log(self, node: str, leaf: str) -> str:
        return f"{self.presence(node)}/log/{leaf}"

    def aggregate(self, category: str) -> str:
        """Public aggregate for ``category`` (written by the bridge only)."""
        validate_category(category)
        return f"{PREFIX}/public/{self.network}/aggregates/{category}"

    def consortium_aggregate(self, category: str) -> str:
        """The consortium's own aggregate for ``category`` on its broker (written by the
        bridge only, read by every member)."""
        validate_category(category)
        return f"{PREFIX}/consortium/{self.network}/{CONSORTIUM_AGGREGATES}/{category}"

    def consortium_receipt(self, category: str) -> str:
        """The disclosure receipt of the consortium's own latest aggregate of ``category``
        (written by the bridge only, read by every member), laid out as the public one."""
        validate_category(category)
        return f"{PREFIX}/consortium/{self.network}/state/bridge/receipts/{category}"

    def bridge_partial(self, bridge_id: str, window_start: int, instance: int,
                       part: int) -> str:
        """Where instance ``instance`` of a scaled-out bridge ``bridge_id`` leaves part
        ``part`` of its sealed partial of a window (retained; only bridge users read or
        write it)."""
        validate_identifier(bridge_id, what="bridge id")
        if min(window_start, instance, part) < 0:
            raise TopicError("a partial's window start, instance and part are non-negative")
        return (f"{PREFIX}/consortium/{self.network}/state/bridge/partials/{bridge_id}/"
                f"{window_start}/{instance}/{part}")

    def bridge_partials_filter(self, bridge_id: str) -> str:
        """Filter for every partial of the scaled-out bridge ``bridge_id``."""
        validate_identifier(bridge_id, what="bridge id")
        return f"{PREFIX}/consortium/{self.network}/state/bridge/partials/{bridge_id}/+/+/+"

    def bridge_state(self, name: str) -> str:
        """Retained bridge records on the public broker (ledger, receipts)."""
        validate_identifier(name, what="bridge state name")
        return f"{PREFIX}/public/{self.network}/state/bridge/{name}"

    def bridge_receipt(self, category: str) -> str:
        """Retained disclosure receipt of the latest aggregate of ``category`` (bridge only).

        Under ``state/bridge/`` so the bridge's existing ACL rights cover it; the ``receipts``
        level cannot clash with :meth:`bridge_state`, whose names are a single level.
        """
        validate_category(category)
        return f"{PREFIX}/public/{self.network}/state/bridge/receipts/{category}"

    # -- subscription filters -------------------------------------------------------------
    def live_filter(self) -> str:
        """Filter for the live insights this member may read."""
        if self.mode == "private":
            return f"{self.network_root}/insights/#"
        if self.mode == "consortium":
            return f"{self.network_root}/+/insights/#"
        return f"{PREFIX}/public/{self.network}/aggregates/#"

    def state_filter(self) -> str:
        """Filter for the retained state this member may read (what ``sync()`` collects)."""
        if self.mode == "private":
            return f"{self.network_root}/state/#"
        if self.mode == "consortium":
            return f"{self.network_root}/+/state/#"
        return f"{PREFIX}/public/{self.network}/aggregates/#"

    def aggregates_filter(self) -> str:
        """Filter for the bridge's aggregates this member reads: the public ones in public
        mode, the consortium's own in consortium mode (private networks get none)."""
        if self.mode == "private":
            raise TopicError("private networks receive no aggregates")
        if self.mode == "consortium":
            return f"{self.network_root}/{CONSORTIUM_AGGREGATES}/#"
        return f"{PREFIX}/public/{self.network}/aggregates/#"

    def checkpoint_filter(self) -> str:
        """Filter for the state checkpoints of every node whose state this member reads."""
        if self.mode == "private":
            return f"{self.network_root}/nodes/+/checkpoint/+"
        if self.mode == "consortium":
            return f"{self.network_root}/+/nodes/+/checkpoint/+"
        raise TopicError("public participants keep no state, so no checkpoints")

    def log_head_filter(self) -> str:
        """Filter for the history-log heads of every node whose data this member reads."""
        if self.mode == "private":
            return f"{self.network_root}/nodes/+/log/head"
        if self.mode == "consortium":
            return f"{self.network_root}/+/nodes/+/log/head"
        return f"{self.network_root}/nodes/+/log/head"  # only bridges may write one

    def bridge_receipts_filter(self) -> str:
        """Filter for the bridge's disclosure receipts of the aggregates this member reads
        (public and consortium modes)."""
        if self.mode == "private":
            raise TopicError("private networks receive no aggregates")
        return f"{PREFIX}/{self.mode}/{self.network}/state/bridge/receipts/#"

    def contrib_filter(self) -> str:
        """Filter for every public participant's contributions (what only the bridge reads)."""
        return f"{PREFIX}/public/{self.network}/contrib/#"

    def presence_filter(self) -> str:
        """Filter for the retained presence of the peers this member may see."""
        if self.mode == "private":
            return f"{self.network_root}/nodes/+"
        if self.mode == "consortium":
            return f"{self.network_root}/+/nodes/+"
        return f"{self.network_root}/nodes/{self.member}"


_LOG_LEAVES: dict[str, Kind] = {"head": "log_head", "req": "log_req", "reply": "log_reply"}


def _split(topic: str) -> list[str]:
    if not isinstance(topic, str) or not topic.startswith(PREFIX + "/"):
        raise TopicError(f"topic {topic!r} is not under {PREFIX}/")
    return topic[len(PREFIX) + 1:].split("/")


@dataclass(frozen=True, slots=True)
class PartialTopic:
    """What a scaled-out bridge's partial topic names (see :meth:`TopicScheme.bridge_partial`)."""

    network: str
    bridge_id: str
    window_start: int
    instance: int
    part: int


def parse_partial_topic(topic: str) -> PartialTopic:
    """Parse a partial topic; :class:`TopicError` for anything else."""
    parts = _split(topic)
    numbers = parts[6:]
    if len(parts) != 9 or parts[0] != "consortium" \
            or parts[2:5] != ["state", "bridge", "partials"] \
            or not all(n.isdigit() and len(n) <= 12 for n in numbers):
        raise TopicError(f"topic {topic!r} is not a bridge partial topic")
    return PartialTopic(network=validate_identifier(parts[1], what="network"),
                        bridge_id=validate_identifier(parts[5], what="bridge id"),
                        window_start=int(numbers[0]), instance=int(numbers[1]),
                        part=int(numbers[2]))


def parse_topic(topic: str) -> ParsedTopic:
    """Parse any pear_mqtt topic; raise :class:`TopicError` for anything outside the scheme."""
    parts = _split(topic)
    try:
        mode = parts[0]
        if mode == "private":
            company, rest, network = parts[1], parts[2:], None
        elif mode == "consortium":
            network, company, rest = parts[1], parts[2], parts[3:]
            if company == CONSORTIUM_AGGREGATES and rest:
                return ParsedTopic(mode, validate_identifier(network, what="network"), None,
                                   "aggregates", category=validate_category("/".join(rest)))
            if company == "state" and len(rest) >= 3 and rest[:2] == ["bridge", "receipts"]:
                return ParsedTopic(mode, validate_identifier(network, what="network"), None,
                                   "bridge_receipt",
                                   category=validate_category("/".join(rest[2:])))
            if company == "state" and len(rest) == 6 and rest[:2] == ["bridge", "partials"]:
                partial = parse_partial_topic(topic)
                return ParsedTopic(mode, partial.network, None, "bridge_partial",
                                   node=partial.bridge_id, page=partial.instance)
            if company in CONSORTIUM_RESERVED:
                raise TopicError(f"topic {topic!r} does not match the pear_mqtt topic scheme")
        elif mode == "public":
            return _parse_public(topic, parts)
        else:
            raise TopicError(f"topic {topic!r}: unknown mode {mode!r}")
        validate_identifier(company, what="company")
        if network is not None:
            validate_identifier(network, what="network")
        kind = rest[0]
        if kind == "insights" and rest[1:] == [MIXED]:
            return ParsedTopic(mode, network, company, "insights")
        if kind == "insights" and len(rest) >= 2:
            return ParsedTopic(mode, network, company, "insights",
                               category=validate_category("/".join(rest[1:])))
        if kind == "state" and len(rest) >= 3:
            return ParsedTopic(mode, network, company, "state",
                               node=validate_identifier(rest[1], what="node"),
                               category=validate_category("/".join(rest[2:])))
        if kind == "nodes" and len(rest) == 4 and rest[2] == "log" and rest[3] in _LOG_LEAVES:
            return ParsedTopic(mode, network, company, _LOG_LEAVES[rest[3]],
                               node=validate_identifier(rest[1], what="node"))
        if kind == "nodes" and len(rest) in (2, 3, 4):
            node = validate_identifier(rest[1], what="node")
            if len(rest) == 2:
                return ParsedTopic(mode, network, company, "nodes", node=node)
            if len(rest) == 3 and rest[2] == "sync":
                return ParsedTopic(mode, network, company, "sync", node=node)
            if len(rest) == 4 and rest[2] == "checkpoint" \
                    and (leaf := _page_part(rest[3])) is not None:
                return ParsedTopic(mode, network, company, "checkpoint", node=node,
                                   page=leaf[0], part=leaf[1])
    except IndexError:
        pass
    raise TopicError(f"topic {topic!r} does not match the pear_mqtt topic scheme")


def _page_part(leaf: str) -> tuple[int, int] | None:
    """``<page>`` or ``<page>.<part>`` (part 1 or more, in decimal, without leading zeros);
    None for anything else."""
    page = _PAGE_NAMES.get(leaf)
    if page is not None:
        return page, 0
    name, dot, part = leaf.partition(".")
    page = _PAGE_NAMES.get(name)
    if (page is None or not dot or not part.isdigit() or not part.isascii()
            or part[0] == "0" or len(part) > 5 or int(part) >= CHECKPOINT_MAX_PARTS):
        return None
    return page, int(part)


def _parse_public(topic: str, parts: list[str]) -> ParsedTopic:
    try:
        network = validate_identifier(parts[1], what="network")
        kind, rest = parts[2], parts[3:]
        if kind == "aggregates" and rest:
            return ParsedTopic("public", network, None, "aggregates",
                               category=validate_category("/".join(rest)))
        if kind == "contrib" and len(rest) >= 2:
            participant = validate_identifier(rest[0], what="participant")
            if rest[1:] == [MIXED]:
                return ParsedTopic("public", network, participant, "contrib")
            return ParsedTopic("public", network, participant, "contrib",
                               category=validate_category("/".join(rest[1:])))
        if kind == "nodes" and len(rest) == 3 and rest[1] == "log" and rest[2] in _LOG_LEAVES:
            # Public topics name no node: the identity checks compare the member alone.
            return ParsedTopic("public", network, validate_identifier(rest[0], what="member"),
                               _LOG_LEAVES[rest[2]])
        if kind == "nodes" and len(rest) in (1, 2):
            participant = validate_identifier(rest[0], what="participant")
            if len(rest) == 1:
                return ParsedTopic("public", network, participant, "nodes", node=participant)
            if rest[1] == "sync":
                return ParsedTopic("public", network, participant, "sync", node=participant)
        if kind == "state" and len(rest) == 2 and rest[0] == "bridge":
            return ParsedTopic("public", network, None, "bridge_state",
                               node=validate_identifier(rest[1], what="bridge state name"))
        if kind == "state" and len(rest) >= 3 and rest[:2] == ["bridge", "receipts"]:
            return ParsedTopic("public", network, None, "bridge_receipt",
                               category=validate_category("/".join(rest[2:])))
    except IndexError:
        pass
    raise TopicError(f"topic {topic!r} does not match the pear_mqtt topic scheme")
