"""``pear-mqtt embedded``: run an :class:`EmbeddedBroker` as a process until a signal."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Sequence
from pathlib import Path

from ...errors import BrokerError, ConfigError
from ..brokerconf import broker_cert_in
from .broker import EmbeddedBroker

__all__ = ["run_embedded"]

log = logging.getLogger(__name__)


def run_embedded(*, mode: str, network: str, pki_dir: Path, port: int = 8883,
                 plain_port: int | None = None, host: str = "127.0.0.1",
                 bridge_users: Sequence[str] = (), cert_file: Path | None = None,
                 key_file: Path | None = None, crl_file: Path | None = None,
                 announce: Callable[[str], None] | None = None) -> int:
    """Run an :class:`EmbeddedBroker` until SIGINT or SIGTERM; SIGHUP reloads the CRL.

    ``pki_dir`` holds ``ca.crt``, one ``broker-*.crt`` with its ``.key`` (unless
    ``cert_file``/``key_file`` are given) and, if present, ``ca.crl`` (unless ``crl_file``).
    A ``plain_port`` opens the anonymous plain listener too. ``announce`` receives the line
    naming the bound addresses (default: printed to stdout). Returns the exit status.
    """
    ca = pki_dir / "ca.crt"
    if not ca.is_file():
        raise ConfigError(f"{ca} not found; create the CA with `pear-mqtt pki init --dir "
                          f"{pki_dir}`")
    if cert_file is None:
        cert_file, found_key = broker_cert_in(pki_dir)
        key_file = key_file or found_key
    if key_file is None:
        key_file = cert_file.with_suffix(".key")
    if crl_file is None and (pki_dir / "ca.crl").is_file():
        crl_file = pki_dir / "ca.crl"
    broker = EmbeddedBroker(mode=mode, network=network, host=host, tls_port=port,
                            port=plain_port or 0, ca_file=ca, cert_file=cert_file,
                            key_file=key_file, crl_file=crl_file, bridge_users=bridge_users,
                            allow_plain=plain_port is not None)
    say = announce or (lambda line: print(line, flush=True))

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()

        def reload() -> None:
            try:
                count = broker.reload_crl()
            except BrokerError as exc:
                log.error("CRL not reloaded: %s", exc)
            else:
                say(f"CRL reloaded: {count} revoked certificate(s)")

        handled: list[signal.Signals] = []
        with contextlib.suppress(NotImplementedError):  # no signal handlers on Windows loops
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stopping.set)
                handled.append(sig)
            if crl_file is not None:
                loop.add_signal_handler(signal.SIGHUP, reload)
                handled.append(signal.SIGHUP)
        try:
            async with broker:
                where = f"mqtts://{host}:{broker.tls_port}"
                if broker.port is not None:
                    where += f" and mqtt://{host}:{broker.port} (plain, anonymous)"
                say(f"pear-mqtt embedded {mode} broker for network {network!r} "
                    f"listening on {where}")
                await stopping.wait()
        finally:
            for sig in handled:
                loop.remove_signal_handler(sig)

    asyncio.run(serve())
    return 0
