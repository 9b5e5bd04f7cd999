"""The agent's run: pump a source's insights into a :class:`~pear_mqtt.node.network.PearNetwork`
through its on-disk outbox, report status while it runs, drain at the end (:func:`run_agent`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from ..backoff import Backoff
from ..config.manager import NetworkConfigManager
from ..config.models import NetworkConfig
from ..errors import ConfigError, OutboxError, PrivacyError, TopicError
from ..files import atomic_write
from ..model.insight import Health, MarketInsight, NetworkStatus
from .records import Rejection, named
from .sources import InsightSource

if TYPE_CHECKING:
    from ..node.network import PearNetwork
    from ..node.producer import PreparedBatch
    from .prepare import PreparedChunk

__all__ = ["BATCH", "AgentReport", "default_outbox_path", "load_agent_config", "run_agent"]

log = logging.getLogger(__name__)

_MAX_REPORTED_REJECTIONS = 100  # kept in the report; every one is counted by reason
_LOGGED_REJECTIONS = 20  # logged one by one; the rest only in the summary at the end
# Insights stored per outbox transaction (and filtered in one go): large enough that the
# transaction's commit is a small share, small enough that the loop is handed over often.
BATCH = 128
_DRAIN_POLL = 0.05  # s between outbox-depth checks while draining
_OUTBOX_RETRY_MIN, _OUTBOX_RETRY_MAX = 1.0, 30.0  # s between tries while the outbox refuses


@dataclass(frozen=True, slots=True)
class AgentReport:
    """What one :func:`run_agent` run did.

    ``read``: insights the source produced; ``rejected``: input lines that were not insights;
    ``queued``: insights accepted into the outbox; ``sent``: insights a broker acknowledged
    during this run (an earlier run's leftovers included); ``failed``: insights the privacy
    filter refused. ``drained`` is true when the outbox was empty at the end; otherwise its
    ``outbox_depth`` rows wait on disk for the next run. ``stopped`` is true when ``stop`` ended the
    run rather than the source running out. ``broker`` is the broker tried and ``error`` why
    the last connection attempt failed (None once connected).
    """

    read: int
    queued: int
    sent: int
    rejected: int
    failed: int
    outbox_depth: int
    drained: bool
    stopped: bool
    duration: float
    status: NetworkStatus
    rejections: tuple[Rejection, ...] = ()
    rejected_by_reason: dict[str, int] = field(default_factory=dict)

    @property
    def broker(self) -> str | None:
        return self.status.broker

    @property
    def error(self) -> str | None:
        return self.status.last_error

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data (at most the first 100 rejections are listed)."""
        return {"read": self.read, "queued": self.queued, "sent": self.sent,
                "rejected": self.rejected,
                "rejected_by_reason": dict(self.rejected_by_reason),
                "failed": self.failed, "outbox_depth": self.outbox_depth,
                "broker": self.broker, "error": self.error,
                "drained": self.drained, "stopped": self.stopped,
                "duration": round(self.duration, 3),
                "rejections": [str(r) for r in self.rejections],
                "status": self.status.model_dump(mode="json")}


@dataclass(slots=True)
class _Tally:
    read: int = 0
    queued: int = 0
    rejected: int = 0
    failed: int = 0
    rejections: list[Rejection] = field(default_factory=list)
    by_reason: Counter[str] = field(default_factory=Counter)

    def reject(self, rejection: Rejection) -> None:
        self.rejected += 1
        self.by_reason[_reason(rejection)] += 1
        if len(self.rejections) < _MAX_REPORTED_REJECTIONS:
            self.rejections.append(rejection)
        if self.rejected <= _LOGGED_REJECTIONS:
            log.warning("rejected %s", rejection)
        elif self.rejected == _LOGGED_REJECTIONS + 1:
            log.warning("more rejected lines: counted by reason, summed up at the end")

    def not_shared(self, what: str) -> None:
        """The privacy filter refused an insight (``what`` names it and the rule)."""
        self.failed += 1
        log.warning("not shared (%s)", what)

    def summary(self) -> str | None:
        """One line: the rejected lines by reason, most frequent first."""
        if not self.rejected:
            return None
        reasons = ", ".join(f"{n} x {why}" for why, n in self.by_reason.most_common(10))
        more = len(self.by_reason) - 10
        return (f"rejected {self.rejected} line(s): {reasons}"
                + (f" and {more} other reason(s)" if more > 0 else ""))


def _reason(rejection: Rejection) -> str:
    """A rejection's reason without the line's particulars (its first clause)."""
    return rejection.error.split(":", 1)[0].strip()[:80] or "unknown"


def default_outbox_path(*, config: NetworkConfig, config_file: Path | None) -> Path:
    """``.pear/outbox-<node_id>.sqlite`` next to ``config_file`` (else the working directory)."""
    # Absolute, so messages name a path that means the same from any working directory.
    base = config_file.resolve().parent if config_file is not None else Path.cwd()
    return base / ".pear" / f"outbox-{config.node_id}.sqlite"


def load_agent_config(*, file: Path | None, outbox: Path | None = None) -> NetworkConfig:
    """The agent's configuration: :meth:`NetworkConfigManager.load` plus an outbox on disk.

    The outbox is ``outbox`` if given, else the config's ``reliability.outbox_path``, else
    :func:`default_outbox_path`. The result passes ``validate(for_connect=True)``.
    """
    config = NetworkConfigManager.load(file=file)
    path = outbox or config.reliability.outbox_path \
        or default_outbox_path(config=config, config_file=file)
    if path != config.reliability.outbox_path:
        rel = config.reliability.model_copy(update={"outbox_path": path})
        config = config.model_copy(update={"reliability": rel})
    return NetworkConfigManager.validate(config, for_connect=True)


def _status_line(tally: _Tally, status: NetworkStatus) -> str:
    return (f"pear-mqtt agent: read={tally.read} queued={tally.queued} "
            f"sent={status.insights_acknowledged} rejected={tally.rejected} "
            f"failed={tally.failed} outbox={status.outbox_depth} "
            f"connected={'yes' if status.connected else 'no'} "
            f"dropped={sum(status.dropped.values())} health={status.health.value}")


class _StatusWriter:
    def __init__(self, *, path: Path | None, stream: TextIO | None) -> None:
        self._path = path
        self._stream = stream
        self._warned = False

    def write(self, tally: _Tally, status: NetworkStatus, *, line: bool = True,
              file: bool = True) -> None:
        if line and self._stream is not None:
            print(_status_line(tally, status), file=self._stream, flush=True)
        if self._path is None or not file:
            return
        try:
            # Readers (health checks) must never see a half-written file.
            atomic_write(self._path, status.model_dump_json(indent=2) + "\n", fsync=False)
        except OSError as exc:
            if not self._warned:  # once: a full disk would otherwise flood the log
                log.warning("cannot write the status file %s: %s", self._path, exc)
                self._warned = True


async def _drain(net: PearNetwork, timeout: float) -> bool:
    """Wait up to ``timeout`` s for an empty outbox; true if it emptied."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while net.status().outbox_depth > 0:
        remaining = deadline - loop.time()
        if remaining <= 0:
            return False
        try:
            await asyncio.wait_for(net.flush(), min(remaining, 1.0))
        except TimeoutError:
            continue
        # flush() only tracks what this process broadcast, so rows an earlier run left in
        # the outbox can remain after it returns: fall back to polling the depth.
        if net.status().outbox_depth > 0:
            await asyncio.sleep(min(_DRAIN_POLL, max(0.0, deadline - loop.time())))
    return True


async def run_agent(*, config: NetworkConfig, source: InsightSource, stop: asyncio.Event,
                    status_interval: float = 10.0, status_file: Path | None = None,
                    drain_timeout: float = 10.0,
                    status_stream: TextIO | None = None,
                    metrics_port: int | None = None,
                    progress: Callable[[int, int], None] | None = None) -> AgentReport:
    """Publish everything ``source`` yields until it ends or ``stop`` is set.

    Joins the network without waiting for the broker (insights wait in the outbox at
    ``config.reliability.outbox_path``, which must be set). Every ``status_interval`` seconds
    (0: never) prints a status line to ``status_stream`` (default ``sys.stderr``) and replaces
    ``status_file`` with the :class:`NetworkStatus` as JSON; the file is also written at the
    start and at the end (then with ``connected: false``). At the end it waits up to
    ``drain_timeout`` seconds for the outbox to empty, then disconnects: what is left stays in
    the outbox for the next run. ``progress`` (a terminal's bars) is called five times a
    second with the input items handled so far (queued or rejected) and the insights the
    broker acknowledged.

    Bad input lines are counted and logged, never raised. While the outbox refuses writes (a
    full disk) the source is held at the current insight and the write retried with backoff.
    Raises :class:`ConfigError` for an unusable config and
    :class:`~pear_mqtt.errors.OutboxError` if the outbox cannot be opened (e.g. another
    process holds it).
    """
    if config.reliability.outbox_path is None:
        raise ConfigError("reliability.outbox_path: the agent keeps unsent insights on disk "
                          "and needs an outbox path (load_agent_config sets a default)")
    if status_interval < 0 or drain_timeout < 0:
        raise ConfigError("status_interval and drain_timeout must be >= 0")
    try:
        config.reliability.outbox_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"reliability.outbox_path: cannot create the directory of "
                          f"{config.reliability.outbox_path} ({exc.strerror or exc})") from exc
    # Imported here so parsing and simulation (and ``pear-mqtt --help``) work without the
    # transport stack loaded.
    from ..node.network import PearNetwork

    started = time.monotonic()
    tally = _Tally()
    writer = _StatusWriter(path=status_file,
                           stream=status_stream if status_stream is not None else sys.stderr)
    net = PearNetwork(config)
    await net.connect(wait=False)
    metrics = None
    if metrics_port is not None:
        from ..ops.metrics import NodeCollector, serve
        metrics = serve(NodeCollector(net.status, cert_file=config.tls.cert_file),
                        port=metrics_port)
        print(f"pear-mqtt agent: metrics at {metrics.url}", file=sys.stderr, flush=True)
    reporter: asyncio.Task[None] | None = None
    ticker: asyncio.Task[None] | None = None
    drained = False
    try:
        writer.write(tally, net.status(), line=False)
        if status_interval > 0:
            reporter = asyncio.create_task(_report_every(status_interval, net, tally, writer))
        if progress is not None:
            ticker = asyncio.create_task(_progress_every(progress, net, tally))
        await _pump(source, net, stop, tally)
        drained = await _drain(net, drain_timeout)
    finally:
        for task in (reporter, ticker):
            if task is not None:
                task.cancel()
                # wait(), unlike awaiting the task, does not raise its CancelledError, which
                # could not be told apart from a cancellation of this run.
                await asyncio.wait([task])
        # Taken before disconnecting, which closes the outbox and so zeroes its depth; the
        # last line shows the connection as it was, the status file that it is closed now.
        final = net.status()
        if progress is not None:
            progress(tally.read + tally.rejected, final.insights_acknowledged)
        writer.write(tally, final, line=True, file=False)
        if metrics is not None:
            metrics.close()
        await net.disconnect()
        final = final.model_copy(update={"connected": False, "health": Health.DOWN})
        writer.write(tally, final, line=False)
        summary = tally.summary()
        if summary is not None:
            log.warning("%s", summary)
    return AgentReport(read=tally.read, queued=tally.queued,
                       sent=final.insights_acknowledged,
                       rejected=tally.rejected,
                       failed=tally.failed, outbox_depth=final.outbox_depth,
                       drained=drained and final.outbox_depth == 0, stopped=stop.is_set(),
                       duration=time.monotonic() - started, status=final,
                       rejections=tuple(tally.rejections),
                       rejected_by_reason=dict(tally.by_reason))


async def _progress_every(progress: Callable[[int, int], None], net: PearNetwork,
                          tally: _Tally) -> None:
    while True:
        progress(tally.read + tally.rejected, net.status().insights_acknowledged)
        await asyncio.sleep(0.2)  # a display refresh; cancelled by run_agent on the way out


async def _report_every(interval: float, net: PearNetwork, tally: _Tally,
                        writer: _StatusWriter) -> None:
    while True:
        await asyncio.sleep(interval)  # cancelled by run_agent on the way out
        writer.write(tally, net.status())


async def _pump(source: InsightSource, net: PearNetwork, stop: asyncio.Event,
                tally: _Tally) -> None:
    batches = source.batches(stop=stop, reject=tally.reject, max_items=BATCH)
    try:
        async for batch in batches:
            if isinstance(batch, list):
                stored = await _stored_batch(net, batch, stop, tally)
            else:
                stored = await _stored_chunk(net, batch, stop, tally)
            if not stored:
                return  # stopped while the outbox refused it: the source is not advanced
            # No yield of our own: broadcast hands the loop to the flusher and the status
            # reporter every millisecond.
    finally:
        aclose = getattr(batches, "aclose", None)
        if aclose is not None:
            await aclose()


async def _stored_batch(net: PearNetwork, batch: list[MarketInsight], stop: asyncio.Event,
                        tally: _Tally) -> bool:
    tally.read += len(batch)
    try:
        stored = await _store(net, batch, stop)
    except (PrivacyError, TopicError):
        # One of them is refused: store the others one by one, counting each refusal.
        for insight in batch:
            try:
                stored = await _store(net, [insight], stop)
            except (PrivacyError, TopicError) as exc:
                tally.not_shared(named(insight, exc))
                continue
            if not stored:
                return False
            tally.queued += 1
        return True
    if stored:
        tally.queued += len(batch)
    return stored


async def _stored_chunk(net: PearNetwork, chunk: PreparedChunk, stop: asyncio.Event,
                        tally: _Tally) -> bool:
    """A worker's chunk (its bad lines were reported by the source)."""
    tally.read += chunk.read
    for refused in chunk.refused:
        tally.not_shared(refused)
    if not chunk.batch.ids:
        return True
    stored = await _store(net, chunk.batch, stop)
    if stored:
        tally.queued += len(chunk.batch.ids)
    return stored


async def _store(net: PearNetwork, batch: list[MarketInsight] | PreparedBatch,
                 stop: asyncio.Event) -> bool:
    """Put ``batch`` into the outbox in one transaction, retrying while it refuses (a full
    disk); false if ``stop`` came first."""
    backoff = Backoff(minimum=_OUTBOX_RETRY_MIN, maximum=_OUTBOX_RETRY_MAX)
    while True:
        try:
            if isinstance(batch, list):
                await net.broadcast_many(batch)
            else:
                await net.broadcast_prepared(batch)
            return True
        except OutboxError as exc:
            # Holding the source still loses nothing: the outbox recovers once the disk has
            # room, and a stop leaves the batch (and a watched file) unread.
            delay = backoff.next_delay()
            log.warning("outbox refused %d insight(s) (%s); retrying in %.1f s", len(batch),
                        exc, delay)
        # Waiting on the event, not sleeping, so a stop request ends the wait at once.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
        if stop.is_set():
            return False
