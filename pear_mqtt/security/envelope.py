"""The envelope every payload travels in: signed, optionally encrypted (AES-256-GCM under a
group key), versioned JSON. :class:`EnvelopeCodec` writes this node's envelopes and reads
(verifies, decrypts, de-duplicates) others'; the wire format is specified in docs/."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, get_args

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic import SecretStr, ValidationError

from ..config.checks import decode_key
from ..config.models import EncryptionConfig
from ..errors import (
    ConfigError,
    DecryptionError,
    EnvelopeError,
    MalformedMessage,
    OversizedMessage,
    SignatureError,
    StaleMessage,
    UnknownKeyError,
    UnsupportedVersion,
)
from ..history.head import LOG_REF
from ..model.insight import MessageKind, NetworkMessage
from .base64url import ascii_field, b64url_decode, b64url_encode
from .identity import Identity
from .replay import ReplayGuard
from .sequence import SEQUENCE_BLOCK, read_reservation, record_reservation
from .signing import Signer
from .trust import TrustStore
from .wirejson import parse_json

if TYPE_CHECKING:
    from ..config.models import NetworkConfig

__all__ = [
    "DEFAULT_MAX_AGE",
    "DEFAULT_MAX_BYTES",
    "VERSION",
    "Decoded",
    "EnvelopeCodec",
]

log = logging.getLogger(__name__)

VERSION = 1
DEFAULT_MAX_BYTES = 1024 * 1024
DEFAULT_MAX_AGE = 30 * 86400.0

_KINDS: frozenset[str] = frozenset(get_args(MessageKind))

_PREFIX = b'{"v":1,'
_SIG_OPEN = b',"sig":"'
_TAIL = b'"}'
_CERT_OPEN = b',"cert":"'
_SK_OPEN = b',"sk":"'
_NONCE_OPEN = b',"nonce":"'
_BODY_OPEN = b',"body":'
# Ed25519 signatures are 64 bytes and DER ECDSA P-256 ones at most 72; the bound is looser so
# that a certificate with an unsupported key type is reported as such, not as a bad "sig".
_MAX_SIGNATURE = 160
_MAX_SEQ = 2**63 - 1
_NONCE_BYTES = 12
_GCM_TAG_BYTES = 16

_HEAD = ("v", "kind", "id", "from", "seq", "ts")
# "log": the message's index in its sender's verified-history log (docs/HISTORY.md).
_LAYOUTS: frozenset[tuple[str, ...]] = frozenset(
    (*_HEAD, *logged, *payload, ref, "sig")
    for logged in ((), ("log",))
    for payload in (("body",), ("kid", "nonce", "enc"))
    for ref in ("cert", "sk")
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Decoded:
    """A verified envelope: the message, who signed it, and its size on the wire."""

    message: NetworkMessage
    signer: Identity
    raw_size: int


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
    ) -> None:
        if max_bytes < 256:
            raise ConfigError(f"max_bytes must be at least 256, got {max_bytes}")
        if not (max_clock_skew >= 0 and math.isfinite(max_clock_skew)):
            raise ConfigError(f"max_clock_skew must be a finite number >= 0, got {max_clock_skew}")
        if not max_age > 0:
            raise ConfigError(f"max_age must be > 0, got {max_age}")
        if replay_window < 1 or max_senders < 1:
            raise ConfigError("replay_window and max_senders must be at least 1")
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
        self._cert_member = _CERT_OPEN + b64url_encode(signer.certificate_der) + b'"'
        self._sk_member = _SK_OPEN + b64url_encode(signer.fingerprint) + b'"'
        self._replay = ReplayGuard(window=replay_window, max_senders=max_senders)
        self._lock = threading.Lock()
        self._seq = int(self._now() * 1000) * 1000
        self._seq_file: Path | None = None
        self._seq_reserved = 0
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
        )

    def persist_sequence(self, path: Path) -> None:
        """Keep sequence numbers growing across restarts even if the clock steps back.

        Numbers start from the clock (ms x 1000), so a node restarted after its clock was
        corrected backwards would send numbers its receivers already saw and have every
        message dropped as a replay. ``path`` records a reserved upper bound, rewritten
        (atomically, fsynced) once per ``SEQUENCE_BLOCK`` messages; a restart continues above
        it. :class:`ConfigError` if the file cannot be read or written.
        """
        floor = read_reservation(path)
        with self._lock:
            self._seq = max(self._seq, floor)
            self._seq_file = path
            self._reserve(self._seq + SEQUENCE_BLOCK)

    def _reserve(self, upto: int) -> None:
        assert self._seq_file is not None
        record_reservation(self._seq_file, upto)
        self._seq_reserved = upto

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
        return self._seq

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
        if kind not in _KINDS:
            raise MalformedMessage(f"cannot encode kind {kind!r}; known kinds: {sorted(_KINDS)}")
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
        with self._lock:
            self._seq += 1
            seq = self._seq
            if self._seq_file is not None and seq >= self._seq_reserved:
                try:
                    self._reserve(seq + SEQUENCE_BLOCK)
                except ConfigError as exc:
                    # Sending goes on (a full disk must not stop it); only a restart after a
                    # backwards clock step could then reuse numbers. Retried next block.
                    log.error("%s", exc)
                    self._seq_reserved = seq + SEQUENCE_BLOCK
        head = b"".join((b'{"v":1,"kind":"', kind.encode("ascii"), b'","id":"',
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
            nonce = os.urandom(_NONCE_BYTES)
            sealed = aead.encrypt(nonce, body_json, aad)
            unsigned = b"".join((aad, _NONCE_OPEN, b64url_encode(nonce), b'","enc":"',
                                 b64url_encode(sealed), b'"', ref))
        signature = self._signer.sign(unsigned + b"}")
        wire = b"".join((unsigned, _SIG_OPEN, b64url_encode(signature), _TAIL))
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
            decoded = self._decode(payload, check_replay, max_age)
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
            return self._decode(payload, False, None, proven=signer)
        except EnvelopeError:
            raise
        except Exception as exc:
            raise MalformedMessage(f"internal error while decoding: "
                                   f"{type(exc).__name__}: {exc}") from exc

    def _decode(self, payload: bytes | bytearray | memoryview, check_replay: bool,
                max_age: float | None, proven: Identity | None = None) -> Decoded:
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise MalformedMessage(f"payload must be bytes, got {type(payload).__name__}")
        data = bytes(payload)
        size = len(data)
        if size > self._max_bytes:
            raise OversizedMessage(f"payload of {size} bytes exceeds the limit of "
                                   f"{self._max_bytes}")
        sig_at = data.rfind(_SIG_OPEN)
        if not (data.startswith(_PREFIX) and data.endswith(_TAIL)) or sig_at < 0:
            self._diagnose(data)
        sig_text = data[sig_at + len(_SIG_OPEN):-len(_TAIL)]
        if len(sig_text) > (_MAX_SIGNATURE * 4 + 2) // 3:
            raise MalformedMessage("'sig' is too long to be a signature")
        head = data[:sig_at]

        # The signer reference is the member right before "sig"; base64 never holds ',"'.
        ref_at = head.rfind(b',"')
        ref = head[ref_at:]
        now = self._now()
        if ref.startswith(_CERT_OPEN) and ref.endswith(b'"'):
            ref_name, ref_text = "cert", ref[len(_CERT_OPEN):-1]
        elif ref.startswith(_SK_OPEN) and ref.endswith(b'"'):
            ref_name, ref_text = "sk", ref[len(_SK_OPEN):-1]
        else:
            raise MalformedMessage("no 'cert' or 'sk' member before 'sig'")
        if proven is not None:
            identity = proven
        else:
            signature = b64url_decode(sig_text, "sig")
            if b64url_encode(signature) != sig_text:
                raise MalformedMessage("'sig' is not canonical base64url")
            if ref_name == "cert":
                signer = self._trust.verify_encoded(ref_text, now=now)
            else:
                known = self._trust.lookup(b64url_decode(ref_text, "sk"), now=now)
                if known is None:
                    raise SignatureError("envelope names its signer by 'sk' only and that "
                                         "certificate has not been seen yet; the sender must "
                                         "embed 'cert'")
                signer = known
            signer.verify(signature, head + b"}")
            identity = signer.identity

        # Authentic from here on. The envelope's members are parsed with duplicate-key checks
        # (a second "from" or "seq" must not slip past other JSON readers); a plain body, the
        # bulk of a batch, is sliced out and parsed once at full speed. Neither ',"body":' nor
        # ',"nonce":"' can occur inside a JSON string, and the header before them is flat, so
        # the first of them is the real member (the layout check below confirms it).
        body_at = head.find(_BODY_OPEN)
        nonce_at = head.find(_NONCE_OPEN)
        plain = body_at >= 0 and (nonce_at < 0 or body_at < nonce_at)
        body_from = body_at + len(_BODY_OPEN)
        if plain:
            obj = parse_json(data[:body_from] + b"0" + data[ref_at:], "envelope")
        else:
            obj = parse_json(data, "envelope")
        if type(obj) is not dict or tuple(obj) not in _LAYOUTS:
            raise MalformedMessage("envelope members are not in the v1 layout "
                                   f"(got {list(obj) if type(obj) is dict else type(obj)})")
        if obj["sig"] != sig_text.decode("ascii") or obj[ref_name] != ref_text.decode("ascii"):
            raise MalformedMessage("'sig' or the signer reference is not where the layout "
                                   "puts it")
        sender = obj["from"]
        if sender != identity.sender:
            raise SignatureError(f"'from' {sender!r} does not match the signing certificate "
                                 f"({identity.sender!r})")
        seq, ts = obj["seq"], obj["ts"]
        if type(seq) is not int or not 0 <= seq <= _MAX_SEQ:
            raise MalformedMessage(f"'seq' must be an integer in [0, 2**63), got {seq!r}")
        if type(ts) is not float and type(ts) is not int:
            raise MalformedMessage(f"'ts' must be a number, got {type(ts).__name__}")
        ts = float(ts)
        if not (math.isfinite(ts) and ts >= 0):
            raise MalformedMessage(f"'ts' must be a finite, non-negative number, got {ts!r}")
        if proven is not None:
            pass  # old on purpose, and proven by a head that was checked when it came
        elif ts > now + self._max_skew:
            raise StaleMessage(f"timestamp lies {ts - now:.1f} s in the future (max clock "
                               f"skew {self._max_skew:g} s)")
        limit = self._max_age if max_age is None else max_age
        if proven is None and now - ts > limit:
            raise StaleMessage(f"message is {now - ts:.0f} s old (max age {limit:g} s)")

        if type(obj["kind"]) is not str or type(obj["id"]) is not str:
            raise MalformedMessage("'kind' and 'id' must be strings")
        if check_replay and proven is None:
            # Cheap early drop for the common case (QoS 1 re-delivery) before decrypting and
            # parsing the body; the authoritative check-and-record comes last.
            self._replay.admit(identity, seq, check=True, record=False)
        if "enc" in obj:
            kid: str | None = obj["kid"]
            body = self._decrypt(data, obj)
        elif plain:
            kid = None
            body = parse_json(data[body_from:ref_at], "body", unique_keys=False)
        else:
            raise MalformedMessage("'body' is not where the layout puts it")
        log_ref = obj.get("log")
        if log_ref is not None and (type(log_ref) is not str or not LOG_REF.fullmatch(log_ref)):
            raise MalformedMessage(f"'log' must be '<log id>:<index>', got {log_ref!r}")
        try:
            message = NetworkMessage(kind=obj["kind"], message_id=obj["id"], sender=sender,
                                     sequence=seq, timestamp=ts, body=body, key_id=kid,
                                     log_ref=log_ref)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                 for e in exc.errors(include_url=False, include_input=False))
            raise MalformedMessage(f"envelope fields are invalid: {problems}") from None
        # Last, so a message dropped for any other reason does not burn its sequence number.
        if proven is None:
            self._replay.admit(identity, seq, check=check_replay, record=True)
        return Decoded(message=message, signer=identity, raw_size=size)

    def _decrypt(self, data: bytes, obj: dict[str, Any]) -> Any:
        kid, nonce_text, enc_text = obj["kid"], obj["nonce"], obj["enc"]
        if type(kid) is not str or type(nonce_text) is not str or type(enc_text) is not str:
            raise MalformedMessage("'kid', 'nonce' and 'enc' must be strings")
        held = self._keys.get(kid)
        if held is None:
            raise UnknownKeyError(f"encrypted with group key {kid!r}, which this node does not "
                                  f"hold (held: {sorted(self._keys)})")
        nonce = b64url_decode(ascii_field(nonce_text, "nonce"), "nonce")
        sealed = b64url_decode(ascii_field(enc_text, "enc"), "enc")
        if len(nonce) != _NONCE_BYTES or len(sealed) < _GCM_TAG_BYTES:
            raise MalformedMessage("'nonce' must be 12 bytes and 'enc' at least 16")
        # The layout is verified, so the first ',"nonce":"' ends the header (it cannot occur
        # inside a JSON string).
        aad = data[:data.find(_NONCE_OPEN)]
        try:
            plain = held[1].decrypt(nonce, sealed, aad)
        except InvalidTag:
            raise DecryptionError(f"ciphertext under group key {kid!r} failed "
                                  "authentication") from None
        # Authenticated by the signature and the GCM tag: parsed at full speed, like a plain
        # body (receivers validate its content with their own models).
        return parse_json(plain, "decrypted body", unique_keys=False)

    def _diagnose(self, data: bytes) -> NoReturn:
        """Explain why ``data`` is not a signed v1 envelope (always raises)."""
        obj = parse_json(data, "payload")
        if type(obj) is not dict:
            raise MalformedMessage(f"payload is a JSON {type(obj).__name__}, not an object")
        if "v" not in obj:
            raise MalformedMessage("payload has no schema version 'v'")
        version = obj["v"]
        if type(version) is not int:
            raise MalformedMessage(f"schema version 'v' must be an integer, got {version!r}")
        if version != VERSION:
            raise UnsupportedVersion(f"envelope schema version {version}; this build reads "
                                     f"{VERSION}")
        if "sig" not in obj:
            raise SignatureError("unsigned message (no 'sig')")
        raise MalformedMessage('envelope is not in canonical v1 form: it must start with '
                               '{"v":1, and end with the "sig" member')
