"""Reading envelopes: verify the signature and the signer's certificate, check the layout,
age and sequence number, decrypt, parse. :class:`EnvelopeOpener` is the reading half of
:class:`~pear_mqtt.security.envelope.EnvelopeCodec`; the format is in docs/DESIGN.md."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic import ValidationError

from ..errors import (
    DecryptionError,
    MalformedMessage,
    OversizedMessage,
    SignatureError,
    StaleMessage,
    UnknownKeyError,
    UnsupportedVersion,
)
from ..history.head import LOG_REF
from ..model.insight import NetworkMessage
from .base64url import ascii_field, b64url_decode, b64url_encode
from .identity import Identity
from .replay import ReplayGuard
from .trust import TrustStore
from .wirejson import parse_json
from .wirelayout import (
    BODY_OPEN,
    CERT_OPEN,
    GCM_TAG_BYTES,
    LAYOUTS,
    MAX_SEQ,
    MAX_SIGNATURE,
    NONCE_BYTES,
    NONCE_OPEN,
    PREFIX_BYTES,
    PREFIXES,
    SIG_OPEN,
    SK_OPEN,
    TAIL,
    signed_bytes,
)

__all__ = ["Decoded", "EnvelopeOpener"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Decoded:
    """A verified envelope: the message, who signed it, and its size on the wire."""

    message: NetworkMessage
    signer: Identity
    raw_size: int


class EnvelopeOpener:
    """Opens received envelopes. ``keys`` maps group key ids to their ciphers (shared with
    the writer); ``clock`` gives the time checked against each envelope's."""

    def __init__(self, *, trust: TrustStore, keys: dict[str, AESGCM], max_bytes: int,
                 max_clock_skew: float, max_age: float, replay: ReplayGuard,
                 clock: Callable[[], float]) -> None:
        self._trust = trust
        self._keys = keys
        self._max_bytes = max_bytes
        self._max_skew = max_clock_skew
        self._max_age = max_age
        self._replay = replay
        self._clock = clock

    def open(self, payload: bytes | bytearray | memoryview, *, check_replay: bool = True,
             max_age: float | None = None, proven: Identity | None = None) -> Decoded:
        """Verify, decrypt and de-duplicate one payload (see :meth:`EnvelopeCodec.decode`);
        with ``proven``, the signer a Merkle proof already tied these bytes to: signature,
        age and sequence number are not checked again. Raises :class:`EnvelopeError`, or an
        unexpected exception only on a bug (the codec turns that into one)."""
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise MalformedMessage(f"payload must be bytes, got {type(payload).__name__}")
        data = bytes(payload)
        size = len(data)
        if size > self._max_bytes:
            raise OversizedMessage(f"payload of {size} bytes exceeds the limit of "
                                   f"{self._max_bytes}")
        sig_at = data.rfind(SIG_OPEN)
        version = PREFIXES.get(data[:PREFIX_BYTES])
        if version is None or not data.endswith(TAIL) or sig_at < 0:
            self._diagnose(data)
        sig_text = data[sig_at + len(SIG_OPEN):-len(TAIL)]
        if len(sig_text) > (MAX_SIGNATURE * 4 + 2) // 3:
            raise MalformedMessage("'sig' is too long to be a signature")
        head = data[:sig_at]

        # The signer reference is the member right before "sig"; base64 never holds ',"'.
        ref_at = head.rfind(b',"')
        ref = head[ref_at:]
        now = self._clock()
        if ref.startswith(CERT_OPEN) and ref.endswith(b'"'):
            ref_name, ref_text = "cert", ref[len(CERT_OPEN):-1]
        elif ref.startswith(SK_OPEN) and ref.endswith(b'"'):
            ref_name, ref_text = "sk", ref[len(SK_OPEN):-1]
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
            signer.verify(signature, signed_bytes(version, head))
            identity = signer.identity

        # Authentic from here on. The envelope's members are parsed with duplicate-key checks
        # (a second "from" or "seq" must not slip past other JSON readers); a plain body, the
        # bulk of a batch, is sliced out and parsed once at full speed. Neither ',"body":' nor
        # ',"nonce":"' can occur inside a JSON string, and the header before them is flat, so
        # the first of them is the real member (the layout check below confirms it).
        body_at = head.find(BODY_OPEN)
        nonce_at = head.find(NONCE_OPEN)
        plain = body_at >= 0 and (nonce_at < 0 or body_at < nonce_at)
        body_from = body_at + len(BODY_OPEN)
        if plain:
            obj = parse_json(data[:body_from] + b"0" + data[ref_at:], "envelope")
        else:
            obj = parse_json(data, "envelope")
        if type(obj) is not dict or tuple(obj) not in LAYOUTS:
            raise MalformedMessage("envelope members are not in the envelope's layout "
                                   f"(got {list(obj) if type(obj) is dict else type(obj)})")
        if obj["sig"] != sig_text.decode("ascii") or obj[ref_name] != ref_text.decode("ascii"):
            raise MalformedMessage("'sig' or the signer reference is not where the layout "
                                   "puts it")
        sender = obj["from"]
        if sender != identity.sender:
            raise SignatureError(f"'from' {sender!r} does not match the signing certificate "
                                 f"({identity.sender!r})")
        seq, ts = obj["seq"], obj["ts"]
        if type(seq) is not int or not 0 <= seq <= MAX_SEQ:
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
        aead = self._keys.get(kid)
        if aead is None:
            raise UnknownKeyError(f"encrypted with group key {kid!r}, which this node does not "
                                  f"hold (held: {sorted(self._keys)})")
        nonce = b64url_decode(ascii_field(nonce_text, "nonce"), "nonce")
        sealed = b64url_decode(ascii_field(enc_text, "enc"), "enc")
        if len(nonce) != NONCE_BYTES or len(sealed) < GCM_TAG_BYTES:
            raise MalformedMessage("'nonce' must be 12 bytes and 'enc' at least 16")
        # The layout is verified, so the first ',"nonce":"' ends the header (it cannot occur
        # inside a JSON string).
        aad = data[:data.find(NONCE_OPEN)]
        try:
            plain = aead.decrypt(nonce, sealed, aad)
        except InvalidTag:
            raise DecryptionError(f"ciphertext under group key {kid!r} failed "
                                  "authentication") from None
        # Authenticated by the signature and the GCM tag: parsed at full speed, like a plain
        # body (receivers validate its content with their own models).
        return parse_json(plain, "decrypted body", unique_keys=False)

    def _diagnose(self, data: bytes) -> NoReturn:
        """Explain why ``data`` is not a signed envelope this build reads (always raises)."""
        obj = parse_json(data, "payload")
        if type(obj) is not dict:
            raise MalformedMessage(f"payload is a JSON {type(obj).__name__}, not an object")
        if "v" not in obj:
            raise MalformedMessage("payload has no schema version 'v'")
        version = obj["v"]
        if type(version) is not int:
            raise MalformedMessage(f"schema version 'v' must be an integer, got {version!r}")
        known = sorted(PREFIXES.values())
        if version not in known:
            raise UnsupportedVersion(f"envelope schema version {version}; this build reads "
                                     f"{' and '.join(map(str, known))}")
        if "sig" not in obj:
            raise SignatureError("unsigned message (no 'sig')")
        raise MalformedMessage(f'envelope is not in canonical v{version} form: it must start '
                               f'with {{"v":{version}, and end with the "sig" member')
