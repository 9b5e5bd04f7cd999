"""The CRL files a receiver checks signers against, re-read when they change
(:class:`CrlFiles`).

A look costs one ``stat()`` per file and happens at most once per ``interval`` seconds: a
changed (modification time, size, inode) means the files are loaded again. A file that cannot
be read or parsed at that point keeps the revocations loaded before (and is logged once), so a
half-copied CRL never lifts a revocation.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from cryptography import x509

from ..errors import PKIError
from .keys import read_material

__all__ = ["CRL_CHECK_INTERVAL", "CrlFiles", "load_crl"]

log = logging.getLogger(__name__)

CRL_CHECK_INTERVAL = 10.0
"""Default seconds between two looks at a CRL file's modification time."""

_Stamp = tuple[int, int, int] | None


def load_crl(path: Path) -> x509.CertificateRevocationList:
    """A PEM or DER CRL; :class:`PKIError` naming the file otherwise."""
    data = read_material(path, "CRL file")
    try:
        return (x509.load_pem_x509_crl(data) if data.lstrip().startswith(b"-----")
                else x509.load_der_x509_crl(data))
    except ValueError as exc:
        raise PKIError(f"cannot load CRL {str(path)!r}: {exc}") from None


def _stamp(path: Path) -> _Stamp:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_mtime_ns, info.st_size, info.st_ino


class CrlFiles:
    """CRL files, loaded once (:meth:`load`) and again whenever :meth:`poll` finds one
    changed; ``clock`` is monotonic seconds (tests move it)."""

    __slots__ = ("_bad", "_clock", "_interval", "_lock", "_next", "_paths", "_stamps")

    def __init__(self, paths: Sequence[Path], *, interval: float = CRL_CHECK_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._paths = tuple(Path(p) for p in paths)
        self._interval = max(0.0, float(interval))
        self._clock = clock
        self._lock = threading.Lock()
        self._stamps: tuple[_Stamp, ...] = ()
        self._bad: tuple[_Stamp, ...] | None = None
        self._next = clock() + self._interval

    @property
    def paths(self) -> tuple[Path, ...]:
        return self._paths

    @property
    def interval(self) -> float:
        """Seconds between two looks at the files."""
        return self._interval

    def load(self) -> list[x509.CertificateRevocationList]:
        """Every file's CRL now (:class:`PKIError` naming a file that fails)."""
        stamps = tuple(_stamp(p) for p in self._paths)
        crls = [load_crl(p) for p in self._paths]
        self._stamps = stamps
        return crls

    def due(self) -> bool:
        """Whether :meth:`poll` would look at the files now."""
        return self._clock() >= self._next

    def poll(self) -> list[x509.CertificateRevocationList] | None:
        """The CRLs again if a file changed since they were loaded and the new ones load;
        None when it is not time to look, nothing changed, or a changed file is unusable."""
        if not self._lock.acquire(blocking=False):
            return None  # another thread is looking right now
        try:
            now = self._clock()
            if now < self._next:
                return None
            self._next = now + self._interval
            stamps = tuple(_stamp(p) for p in self._paths)
            if stamps == self._stamps or stamps == self._bad:
                return None
            try:
                crls = [load_crl(p) for p in self._paths]
            except PKIError as exc:
                self._bad = stamps
                log.warning("keeping the revocations loaded before: %s", exc)
                return None
            self._stamps, self._bad = stamps, None
            return crls
        finally:
            self._lock.release()
