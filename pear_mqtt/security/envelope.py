"""The envelope every payload travels in: signed, optionally encrypted (AES-256-GCM under a
group key), versioned JSON. :class:`EnvelopeCodec` writes this node's envelopes and reads
(verifies, decrypts, de-duplicates) others' through its collaborators: the layout
(``wirelayout``), the reader (``opener``), the sequence numbers (``sequence``). The wire
format is specified in docs/DESIGN.md."""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic import SecretStr

from ..config.checks import decode_key
from ..config.models import EncryptionConfig
from ..errors import ConfigError, EnvelopeError, MalformedMessage, OversizedMessage
from .base64url import b64url_encode
from .identity import Identity
from .opener import Decoded, EnvelopeOpener
from .replay import ReplayGuard
from .sequence import SequenceCounter
from .signing import Signer
from .trust import TrustStore
from .wirelayout import (
    CERT_OPEN,
    KINDS,
    NONCE_BYTES,
    NONCE_OPEN,
    PREFIXES,
    SIG_OPEN,
    SK_OPEN,
    TAIL,
    VERSION,
    signed_bytes,
)

if TYPE_CHECKING:
    from ..config.models import NetworkConfig

__all__ = [
    "DEFAULT_MAX_AGE",
    "DEFAULT_MAX_BYTES",
    "VERSION",
    "Decoded",
    "EnvelopeCodec",
]

DEFAULT_MAX_BYTES = 1024 * 1024
DEFAULT_MAX_AGE = 30 * 86400.0


def _group_key(kid: str, secret: SecretStr) -> AESGCM:
    raw = decode_key(secret.get_secret_value())
    if raw is None:
        raise ConfigError(f"encryption key {kid!r} is not valid base64")
    if len(raw) != 32:
        raise ConfigError(f"encryption key {kid!r} decodes to {len(raw)} bytes; AES-256-GCM "
                          "needs exactly 32")
    return AESGCM(raw)


class EnvelopeCodec:
    """Encodes this node's envelopes and decodes (verifies, decrypts, de-duplicates) others'.

    Safe to share between threads. ``stats`` counts decoded envelopes (``"decoded"``) and
    drops by :attr:`EnvelopeError.reason`.

    ``max_senders`` bounds the replay state (one window per sender identity); replay state is
    keyed by the identity the certificate names, not the certificate, so a node whose
    certificate is renewed keeps its window.
    """

    def __init__(
        self,
        *,
        signer: Signer,
        trust: TrustStore,
        encryption: EncryptionConfig | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_clock_skew: float = 300.0,
        max_age: float = DEFAULT_MAX_AGE,
        replay_window: int = 4096,
        embed_certificate: bool = True,
        clock: Callable[[], float] = time.time,
        max_senders: int = 10_000,
        write_version: int = VERSION,
    ) -> None:
        if max_bytes < 256:
            raise ConfigError(f"max_bytes must be at least 256, got {max_bytes}")
        if not (max_clock_skew >= 0 and math.isfinite(max_clock_skew)):
            raise ConfigError(f"max_clock_skew must be a finite number >= 0, got {max_clock_skew}")
        if not max_age > 0:
            raise ConfigError(f"max_age must be > 0, got {max_age}")
        if replay_window < 1 or max_senders < 1:
            raise ConfigError("replay_window and max_senders must be at least 1")
        if write_version not in PREFIXES.values():
            raise ConfigError(f"envelope version must be one of "
                              f"{sorted(PREFIXES.values())}, got {write_version!r}")
        self._version = write_version
        self._head_open = b'{"v":%d,"kind":"' % write_version
        self._signer = signer
        self._trust = trust
        self._max_bytes = max_bytes
        self._max_skew = float(max_clock_skew)
        self._max_age = float(max_age)
        self._embed = embed_certificate
        self._clock = clock
        self._keys: dict[str, tuple[bytes, AESGCM]] = {}
        self._active: str | None = None
        if encryption is not None:
            for kid, secret in encryption.keys.items():
                self._keys[kid] = (json.dumps(kid, ensure_ascii=False).encode(),
                                   _group_key(kid, secret))
            self._active = encryption.active
        self._from = json.dumps(signer.sender, ensure_ascii=False).encode()
        self._cert_member = CERT_OPEN + b64url_encode(signer.certificate_der) + b'"'
        self._sk_member = SK_OPEN + b64url_encode(signer.fingerprint) + b'"'
        self._replay = ReplayGuard(window=replay_window, max_senders=max_senders)
        self._opener = EnvelopeOpener(
            trust=trust, keys={kid: aead for kid, (_, aead) in self._keys.items()},
            max_bytes=max_bytes, max_clock_skew=self._max_skew, max_age=self._max_age,
            replay=self._replay, clock=self._now)
        self._lock = threading.Lock()
        self._seq = SequenceCounter(start=int(self._now() * 1000) * 1000)
        self._stats: Counter[str] = Counter()
        # Lets this node read its own cert-less envelopes; a signer from another CA (a bridge
        # that signs for one network and reads another) is simply not pre-registered.
        with contextlib.suppress(EnvelopeError):
            trust.verify_certificate(signer.certificate_der, now=self._now())

    @classmethod
    def from_config(cls, config: NetworkConfig, *, crl_files: Sequence[Path] = (),
                    clock: Callable[[], float] = time.time,
                    embed_certificate: bool = True) -> EnvelopeCodec:
        """Build the codec a node of ``config`` uses (its TLS material signs and verifies).

        Signers are checked against ``crl_files``, by default ``tls.crl_file`` if set (re-read
        when it changes, every ``tls.crl_check_interval`` seconds at most).
        """
        tls = config.tls
        missing = tls.missing()
        if missing:
            raise ConfigError(f"envelopes need {', '.join(missing)} to sign and verify")
        assert tls.ca_file and tls.cert_file and tls.key_file
        if not crl_files and tls.crl_file is not None:
            crl_files = (tls.crl_file,)
        rel = config.reliability
        return cls(
            signer=Signer.from_files(key_file=tls.key_file, cert_file=tls.cert_file),
            trust=TrustStore.from_files(ca_files=[tls.ca_file], crl_files=crl_files,
                                        network=config.network_id,
                                        crl_check_interval=tls.crl_check_interval),
            encryption=config.encryption, max_bytes=rel.max_message_bytes,
            max_clock_skew=rel.max_clock_skew, max_age=rel.max_message_age,
            embed_certificate=embed_certificate, clock=clock,
            write_version=rel.envelope_version,
        )

    def persist_sequence(self, path: Path) -> None:
        """Keep sequence numbers growing across restarts even if the clock steps back.

        Numbers start from the clock (ms x 1000), so a node restarted after its clock was
        corrected backwards would send numbers its receivers already saw and have every
        message dropped as a replay. ``path`` records a reserved upper bound, rewritten
        (atomically, fsynced) once per ``SEQUENCE_BLOCK`` messages; a restart continues above
        it. :class:`ConfigError` if the file cannot be read or written.
        """
        self._seq.persist(path)

    # -- properties -----------------------------------------------------------------------
    @property
    def signer(self) -> Signer:
        return self._signer

    @property
    def trust(self) -> TrustStore:
        return self._trust

    @property
    def active_key_id(self) -> str | None:
        """The group key new envelopes are encrypted with by default, if any."""
        return self._active

    @property
    def last_sequence(self) -> int:
        """The sequence number of the envelope this codec encoded last."""
        return self._seq.last

    @property
    def max_bytes(self) -> int:
        return self._max_bytes

    @property
    def stats(self) -> dict[str, int]:
        """``{"decoded": n, "<reason>": n, ...}`` since the codec was created."""
        with self._lock:
            return dict(self._stats)

    @property
    def tracked_senders(self) -> int:
        """How many senders the replay guard currently remembers."""
        return len(self._replay)

    def _now(self) -> float:
        now = float(self._clock())
        if not (math.isfinite(now) and now >= 0):
            raise ConfigError(f"the codec clock returned {now!r}")
        return now

    # -- encode ---------------------------------------------------------------------------
    def encode(self, *, kind: str, body: Any, encrypt: bool | None = None,
               embed_certificate: bool | None = None, log_ref: str | None = None) -> bytes:
        """Sign (and by default, when a group key is active, encrypt) one envelope
        (``log_ref``: its place in the signer's history log, as for :meth:`encode_json`).

        ``body`` must be JSON-serialisable (finite numbers only). Raises
        :class:`MalformedMessage` for an unknown ``kind`` or a body that is not JSON,
        :class:`OversizedMessage` if the envelope would exceed ``max_bytes`` (split the
        batch), and :class:`ConfigError` for ``encrypt=True`` without an active key.
        """
        try:
            body_json = json.dumps(body, ensure_ascii=False, allow_nan=False,
                                   separators=(",", ":")).encode("utf-8")
        except (TypeError, ValueError, RecursionError) as exc:
            raise MalformedMessage(f"cannot encode body as JSON: {exc}") from None
        return self.encode_json(kind=kind, body_json=body_json, encrypt=encrypt,
                                embed_certificate=embed_certificate, log_ref=log_ref)

    def encode_json(self, *, kind: str, body_json: bytes, encrypt: bool | None = None,
                    embed_certificate: bool | None = None, log_ref: str | None = None
                    ) -> bytes:
        """:meth:`encode` for a body that is already JSON text (UTF-8 bytes).

        For a sender that stored its items as JSON (the outbox): a batch is their join, with
        no parse and re-serialise per item. The caller vouches that ``body_json`` is one JSON
        value; receivers drop the envelope as malformed otherwise. ``log_ref`` is
        ``"<log id>:<index>"``, the envelope's place in this node's history log (signed with
        the rest; see :func:`pear_mqtt.history.head.parse_log_ref`).
        """
        if kind not in KINDS:
            raise MalformedMessage(f"cannot encode kind {kind!r}; known kinds: {sorted(KINDS)}")
        if encrypt is None:
            kid = self._active
        elif encrypt:
            if self._active is None:
                raise ConfigError("encrypt=True but no active group key is configured "
                                  "(encryption.active)")
            kid = self._active
        else:
            kid = None
        ts = self._now()
        seq = self._seq.next()
        head = b"".join((self._head_open, kind.encode("ascii"), b'","id":"',
                         secrets.token_urlsafe(16).encode("ascii"), b'","from":', self._from,
                         b',"seq":', str(seq).encode("ascii"), b',"ts":',
                         repr(ts).encode("ascii")))
        if log_ref is not None:
            head += b',"log":"' + log_ref.encode("ascii") + b'"'
        embed = self._embed if embed_certificate is None else embed_certificate
        ref = self._cert_member if embed else self._sk_member
        if kid is None:
            unsigned = b"".join((head, b',"body":', body_json, ref))
        else:
            kid_json, aead = self._keys[kid]
            aad = head + b',"kid":' + kid_json
            nonce = os.urandom(NONCE_BYTES)
            sealed = aead.encrypt(nonce, body_json, aad)
            unsigned = b"".join((aad, NONCE_OPEN, b64url_encode(nonce), b'","enc":"',
                                 b64url_encode(sealed), b'"', ref))
        signature = self._signer.sign(signed_bytes(self._version, unsigned))
        wire = b"".join((unsigned, SIG_OPEN, b64url_encode(signature), TAIL))
        if len(wire) > self._max_bytes:
            raise OversizedMessage(f"envelope of {len(wire)} bytes exceeds the limit of "
                                   f"{self._max_bytes}; split the batch")
        return wire

    # -- decode ---------------------------------------------------------------------------
    def decode(self, payload: bytes | bytearray | memoryview, *, check_replay: bool = True,
               max_age: float | None = None) -> Decoded:
        """Verify, decrypt and de-duplicate one received payload.

        ``check_replay=False`` accepts a sequence number already seen (retained messages
        re-delivered on a new subscription); the number is still recorded. ``max_age``
        overrides the codec's age limit for this call.

        Raises only :class:`EnvelopeError` subclasses, for any input.
        """
        try:
            decoded = self._opener.open(payload, check_replay=check_replay, max_age=max_age)
        except EnvelopeError as exc:
            with self._lock:
                self._stats[exc.reason] += 1
            raise
        except Exception as exc:
            # Last line of defence for the "never crash on input" contract; the unit tests
            # assert this path is never taken.
            with self._lock:
                self._stats[MalformedMessage.reason] += 1
            raise MalformedMessage(f"internal error while decoding: "
                                   f"{type(exc).__name__}: {exc}") from exc
        with self._lock:
            self._stats["decoded"] += 1
        return decoded

    def open_proven(self, payload: bytes, signer: Identity) -> Decoded:
        """Decrypt and parse an envelope of ``signer``'s history log whose exact bytes a
        Merkle proof tied to a signed head of ``signer`` (which was verified, certificate
        and all, when it arrived): the envelope's own signature, age and sequence number are
        not checked again (docs/HISTORY.md, "Repair"). Raises :class:`EnvelopeError`."""
        try:
            return self._opener.open(payload, check_replay=False, proven=signer)
        except EnvelopeError:
            raise
        except Exception as exc:
            raise MalformedMessage(f"internal error while decoding: "
                                   f"{type(exc).__name__}: {exc}") from exc
