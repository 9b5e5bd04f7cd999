"""Hostile history-log traffic at a receiving node, through a real mosquitto broker.

A member (initech) holds valid certificates and writes only what the broker ACL lets any
member write: answers into another node's ``log/reply`` and heads in its own subtree. Its
node ``store-1`` is even the network archive the victim trusts to serve other nodes' logs.
From acme's genuine log it crafts a range with one forged entry, a reordered range, and a
range cut short but passed off as complete; it answers for acme's log from a node that is
not the archive, answers for a log nobody asked for, republishes acme's signed head as its
own, and signs two heads of one length with different roots. Each is refused and counted in
``status().log_refused`` under its own reason, exactly once, while every insight acme sent
arrives exactly once and acme's log stays verified.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from brokers import GROUP_KEY, MosquittoBroker, NetworkPKI, probe
from faultkit import Collector, stream
from faults_report import record
from hostile_fuzz import codec_for

from pear_mqtt.config.models import NetworkConfig
from pear_mqtt.history.frame import join, leaves_digest, pack_entries
from pear_mqtt.history.head import TreeHead, head_body
from pear_mqtt.history.log import AppendLog
from pear_mqtt.history.merkle import leaf_hash
from pear_mqtt.model.topics import TopicScheme
from pear_mqtt.node.history import range_bodies
from pear_mqtt.node.network import PearNetwork
from pear_mqtt.security.base64url import b64url_encode
from pear_mqtt.security.envelope import EnvelopeCodec

ATTACKER = "initech"
ARCHIVE = f"{ATTACKER}/store-1"


def _answer(codec: EnvelopeCodec, body: dict[str, Any], topics: list[str],
            entries: list[bytes]) -> bytes:
    """A ``logrange`` answer signed by ``codec`` carrying exactly ``entries`` (its digest
    made to match them, so only the entries themselves can give the forgery away)."""
    crafted = {**body, "count": len(entries), "topics": topics,
               "digest": b64url_encode(leaves_digest([leaf_hash(e) for e in entries])
                                       ).decode("ascii")}
    crafted.pop("more", None)  # each is passed off as the whole answer
    return join(codec.encode(kind="logrange", body=crafted, encrypt=False),
                pack_entries(entries))


def _tamper(entry: bytes) -> bytes:
    """The same envelope with one character of its ciphertext changed."""
    at = entry.index(b'"enc":"') + 20
    return entry[:at] + (b"A" if entry[at:at + 1] != b"A" else b"B") + entry[at + 1:]


async def test_hostile_log_answers_and_heads_are_refused_and_counted_by_reason(
        mosquitto: MosquittoBroker, node: Callable[..., NetworkConfig], pki: NetworkPKI,
        tmp_path: Path) -> None:
    url = mosquitto.tls_url
    sent: list[str] = []
    net = pki.network
    archive = codec_for(pki.node(ATTACKER, "store-1"), pki.ca, keys={"k1": GROUP_KEY})
    stranger = codec_for(pki.node(ATTACKER, "store-2"), pki.ca, keys={"k1": GROUP_KEY})
    forker = codec_for(pki.node(ATTACKER, "store-3"), pki.ca, keys={"k1": GROUP_KEY})
    theirs = TopicScheme(mode="consortium", network=net, member=ATTACKER)
    reply_topic = TopicScheme(mode="consortium", network=net, member="globex").log_reply(
        "store-1")
    acme_head_topic = TopicScheme(mode="consortium", network=net, member="acme").log_head(
        "store-1")
    async with PearNetwork(node("acme", url, outbox=tmp_path / "acme.sqlite",
                                batch_max_items=5)) as tx:
        await stream(tx, 60, rate=0, sent=sent)
        await tx.flush(timeout=30)
        async with PearNetwork(node("globex", url, session_expiry=0,
                                    archive=ARCHIVE)) as rx:
            got = Collector(rx)
            await got.wait_ids(set(sent), timeout=60)
            await rx.wait_logs(lambda: any(
                v.sender.startswith("acme/") and v.head_length is not None
                and v.head_length >= v.held and v.verified == v.head_length
                for v in rx.logs()), timeout=30)
            (view,) = [v for v in rx.logs() if v.sender.startswith("acme/")]
            assert view.head_length is not None and view.head_length >= 4
            # acme's genuine entries, as any holder of its log could serve them.
            copy = tmp_path / "acme-log"
            shutil.copytree(tmp_path / "acme.sqlite.history", copy)
            held = AppendLog.open(copy)
            (body, _parts), *_ = range_bodies(
                held, log_id=view.log_id, first=0, end=view.head_length, request_id=None,
                size=view.head_length, max_bytes=1 << 20)
            n = body["count"]
            assert n >= 4 and "proof" in body
            records = held.records(0, n)
            held.close()
            topics = [t for t, _ in records]
            entries = [e for _, e in records]
            as_archive = {**body, "sender": view.sender}
            forged = list(entries)
            forged[1] = _tamper(entries[1])
            swapped = [entries[1], entries[0], *entries[2:]]
            swapped_topics = [topics[1], topics[0], *topics[2:]]
            now = time.time()
            heads = [head_body(TreeHead(log="evil", length=3, root=bytes([b]) * 32, time=now))
                     for b in (1, 2)]
            hostile = [
                (reply_topic, _answer(archive, as_archive, topics, forged), "forged_entry"),
                (reply_topic, _answer(archive, as_archive, swapped_topics, swapped),
                 "reordered_range"),
                (reply_topic, _answer(archive, as_archive, topics[:-1], entries[:-1]),
                 "cut_range"),
                (reply_topic, _answer(stranger, as_archive, topics, entries), "unrequested"),
                (reply_topic, _answer(stranger, body, topics, entries), "unrequested"),
                (theirs.log_head("store-3"), forker.encode(kind="loghead", body=heads[0]),
                 None),
                (theirs.log_head("store-3"), forker.encode(kind="loghead", body=heads[1]),
                 "forked_head"),
            ]
            with probe(mosquitto, pki.node(ATTACKER, "store-1"),
                       subscribe=[acme_head_topic]) as evil:
                acme_head, _ = await asyncio.to_thread(evil.expect, acme_head_topic)
                hostile.append((theirs.log_head("store-1"), acme_head.payload,
                                "foreign_head"))
                for topic, payload, _reason in hostile:
                    rc = await asyncio.to_thread(evil.publish, topic, payload)
                    assert rc is not None and not rc.is_failure, (topic, rc)
            expected: dict[str, int] = {}
            for _topic, _payload, reason in hostile:
                if reason is not None:
                    expected[reason] = expected.get(reason, 0) + 1
            await rx.wait_logs(lambda: rx.status().log_refused == expected, timeout=30)
            status = rx.status()
            (view_after,) = [v for v in rx.logs() if v.sender.startswith("acme/")]
    assert status.log_refused == expected
    assert status.log_forks == 1 and [f.sender for f in rx.forks] == [f"{ATTACKER}/store-3"]
    assert not view_after.forked and view_after.verified == view.verified
    missed = len(set(sent) - got.ids.keys())
    assert missed == 0 and set(got.ids) == set(sent)
    assert got.by_member.get(ATTACKER, 0) == 0
    assert status.duplicates == 0
    notes = {
        "forged_entry": "the archive serves acme's range with one entry's ciphertext changed "
                        "(digest made to match): its range proof fails, the entry's "
                        "signature too",
        "reordered_range": "the archive serves acme's range with two entries swapped",
        "cut_range": "the archive serves acme's range one entry short, as complete, with "
                     "the proof of the whole range",
        "unrequested": "a member that is not the archive answers for acme's log, and for a "
                       "log nobody asked for",
        "foreign_head": "a member republishes acme's signed head as its own",
        "forked_head": "a member signs two heads of one length with different roots (also "
                       "counted in log_forks, with both heads as evidence)",
    }
    for reason, count in sorted(expected.items()):
        record(f"hostile log traffic refused: {reason}", group="history", sent=len(sent),
               delivered=len(sent) - missed, lost=missed, duplicated=status.duplicates,
               refused=count, notes=notes[reason] + f"; counted as log_refused[{reason!r}]")
