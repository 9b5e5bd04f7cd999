"""What a node signs about its log: the tree head (length, first entry held, root, time) and
the ``"<log id>:<index>"`` reference each logged envelope carries. Both travel inside signed
envelopes (kinds ``loghead``, and the ``log`` member), so no second signature scheme exists.
Format: docs/HISTORY.md."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import ProofFailed
from ..security.base64url import b64url_decode, b64url_encode
from .merkle import HASH_SIZE

__all__ = ["LOG_REF", "TreeHead", "head_body", "parse_head", "parse_log_ref"]

LOG_REF = re.compile(r"([A-Za-z0-9_-]{1,32}):(0|[1-9][0-9]{0,18})")
"""An envelope's ``log`` member: ``<log id>:<index>``."""
_ID = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,32}$")]


class TreeHead(BaseModel):
    """A signed statement about one log: its first ``length`` entries hash to ``root``;
    entries before ``start`` are no longer held (retention)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    log: _ID
    length: Annotated[int, Field(ge=0)]
    start: Annotated[int, Field(ge=0)] = 0
    root: bytes
    time: float
    # The envelope sequence number of the latest version of each checkpoint page (page
    # number -> seq): the retained state this head covers, which sync() waits for.
    pages: dict[int, Annotated[int, Field(ge=0)]] = Field(default_factory=dict)


def head_body(head: TreeHead) -> dict[str, Any]:
    """The ``loghead`` envelope's body."""
    return {"log": head.log, "length": head.length, "start": head.start,
            "root": b64url_encode(head.root).decode("ascii"), "time": head.time,
            "pages": {f"{page:02x}": index for page, index in sorted(head.pages.items())}}


def parse_head(body: Any) -> TreeHead:
    """A ``loghead`` body as a :class:`TreeHead`; :class:`ProofFailed` if it is not one."""
    try:
        if not isinstance(body, dict) or not isinstance(body.get("root"), str):
            raise ValueError("not a tree head")
        root = b64url_decode(body["root"].encode("ascii"), "root")
        if len(root) != HASH_SIZE:
            raise ValueError(f"root has {len(root)} bytes, not {HASH_SIZE}")
        pages = body.get("pages", {})
        if not isinstance(pages, dict):
            raise ValueError("pages is not an object")
        head = TreeHead(log=body.get("log"), length=body.get("length"),
                        start=body.get("start", 0), root=root, time=body.get("time"),
                        pages={int(k, 16): v for k, v in pages.items()})
    except (ValueError, ValidationError, UnicodeEncodeError) as exc:
        raise ProofFailed(f"malformed tree head: {exc}") from None
    if head.start > head.length:
        raise ProofFailed(f"tree head says entries from {head.start} are held of {head.length}")
    return head


def parse_log_ref(ref: str) -> tuple[str, int]:
    """``"<log id>:<index>"`` as (log id, index); :class:`ProofFailed` if malformed."""
    m = LOG_REF.fullmatch(ref)
    if m is None:
        raise ProofFailed(f"log reference {ref!r} is not '<log id>:<index>'")
    return m.group(1), int(m.group(2))
