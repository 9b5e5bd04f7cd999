"""One chunk of an input file's lines made ready to store: parsed and validated
(:class:`~.records.RecordParser`), then filtered, sealed and named in one batch
(:class:`~pear_mqtt.node.producer.Preparer`). What a worker process does with each chunk it
is sent, and what the agent does itself when it has no worker."""

from __future__ import annotations

from typing import NamedTuple

from ..errors import PrivacyError, TopicError
from ..model.insight import MarketInsight
from ..node.producer import Prepared, PreparedBatch, Preparer
from .records import RecordParser, Rejection, named

__all__ = ["PreparedChunk", "prepare_lines"]


class PreparedChunk(NamedTuple):
    """The outcome of one chunk of lines: how many were insights (``read``), the lines that
    were not, the prepared batch, and the insights the privacy filter refused (one text each,
    naming the insight and the rule)."""

    read: int
    rejections: list[Rejection]
    batch: PreparedBatch
    refused: list[str]


def prepare_lines(preparer: Preparer, parser: RecordParser,
                  lines: list[tuple[int, str]]) -> PreparedChunk:
    """Parse ``lines`` and prepare their insights in one batch; when the filter refuses one,
    the others are prepared one by one (the refused are reported, not raised)."""
    insights: list[MarketInsight] = []
    rejections: list[Rejection] = []
    for lineno, text in lines:
        record = parser.parse(lineno, text)
        if isinstance(record, Rejection):
            rejections.append(record)
        else:
            insights.append(record)
    try:
        batch = preparer.prepare_many(insights)
    except (PrivacyError, TopicError):
        batch, refused = _one_by_one(preparer, insights)
        return PreparedChunk(len(insights), rejections, batch, refused)
    return PreparedChunk(len(insights), rejections, batch, [])


def _one_by_one(preparer: Preparer, insights: list[MarketInsight]
                ) -> tuple[PreparedBatch, list[str]]:
    ids: list[str] = []
    items: list[Prepared] = []
    refused: list[str] = []
    unsealed = 0
    for insight in insights:
        try:
            item_id, item, dropped = preparer.prepare(insight)
        except (PrivacyError, TopicError) as exc:
            refused.append(named(insight, exc))
            continue
        ids.append(item_id)
        unsealed += dropped
        if item is not None:
            items.append(item)
    return PreparedBatch(preparer.origin, ids, items, unsealed), refused
