"""Render mosquitto 2 configuration for a pear_mqtt network.

:func:`render` writes two files from the templates under ``broker/mosquitto/``:

- ``mosquitto.conf``: a mutual-TLS listener (``require_certificate``,
  ``use_identity_as_username``, ``crlfile``, ``acl_file``), persistence, retained-message
  settings and limits sized for the pear_mqtt workload; optionally a plaintext listener for
  local development.
- ``acl``: generated from :func:`pear_mqtt.topics.acl_rules`, so the broker enforces exactly
  the topic scheme the library publishes to: ``pattern`` lines (``%u`` = certificate CN = the
  member) for every member, ``user <bridge>`` sections for the bridge identities, and
  ``user <member>`` sections with ``topic deny`` lines for the nodes whose certificate was
  revoked.

Revocation, and the retained state a revoked node left behind
    The CRL keeps a revoked node from connecting, but the retained state and presence it
    published before stay on the broker. mosquitto 2.0 (checked on 2.0.11) hides them with two
    features together: ``check_retain_source true`` (in ``common.conf.tmpl``) makes it re-check,
    each time it delivers a retained message, that the message's original publisher -- by
    username, i.e. the member -- still has *write* access to the topic; and the ACL's
    ``deny`` lines (which win over every grant, wherever they stand) take the node's
    ``state/<node>/#``, ``nodes/<node>`` and ``nodes/<node>/sync`` away from its member.
    Other members' subscribers then stop receiving the node's retained messages
    (check_retain_source), the member's other stores too (the deny is read access as well),
    and a revoked node that is still connected cannot write there any more. The member's other
    stores keep their own topics: the rules are per node.

    Procedure: ``pear-mqtt pki revoke ...``, then ``pear-mqtt broker render --pki CA_DIR ...``
    (with a ``ca_dir``, :func:`render` reads the revoked nodes from the CA registry, see
    :func:`pear_mqtt.pki.revoked_nodes`), then SIGHUP mosquitto: it re-reads the ACL file and
    the CRL. The messages stay stored but are never delivered. There is no "clear retained"
    step: nobody has write access to those topics any more (that is the point), so nobody
    could clear them over MQTT, and hiding is enough. Re-keying the node (a new certificate
    for the same node id) lifts the deny; the old messages are then served again until the
    node overwrites them, and receivers drop them because their signing certificate is on
    the CRL.

The broker's certificate and the CA material come from :mod:`pear_mqtt.pki`. mosquitto drops
root privileges to the ``mosquitto`` user before it reads the key file, so either make the key
readable by that user or set ``run_as``.
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from ..errors import BrokerError, ConfigError, PKIError, TopicError
from ..model.topics import AclRule, acl_rules, validate_identifier
from ..security.pki import revoked_nodes

__all__ = [
    "DEFAULT_TEMPLATE_DIR",
    "Mode",
    "RenderedBroker",
    "acl_text",
    "broker_cert_in",
    "render",
]

Mode = Literal["private", "consortium", "public"]

DEFAULT_TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "broker" / "mosquitto"
"""Where the templates live in a source checkout (``broker/mosquitto``)."""

_DEFAULT_LOG_TYPES = ("error", "warning", "notice", "information")
# Room above the envelope limit for the topic, packet header and MQTT 5 properties.
_PACKET_OVERHEAD = 64 * 1024


@dataclass(frozen=True, slots=True)
class RenderedBroker:
    """The files :func:`render` wrote: run ``mosquitto -c conf_path``.

    ``revoked`` lists the ``(member, node)`` pairs whose topics the ACL denies.
    """

    conf_path: Path
    acl_path: Path
    revoked: tuple[tuple[str, str], ...] = ()


def _modes(mode: str, acl_modes: Sequence[str] | None) -> list[str]:
    modes = [mode, *(acl_modes or ())]
    for m in modes:
        if m not in get_args(Mode):
            raise ConfigError(f"mode must be one of {list(get_args(Mode))}, got {m!r}")
    return list(dict.fromkeys(modes))


def acl_text(*, modes: Iterable[str], network: str, bridge_users: Iterable[str] = (),
             revoked: Iterable[tuple[str, str]] = ()) -> str:
    """The mosquitto ``acl_file`` for a broker serving ``modes`` of ``network``.

    Pattern rules come first, then one ``user`` section per bridge identity, then one per
    member with revoked nodes (``revoked``: ``(member, node)`` pairs) holding its ``topic
    deny`` lines: in a mosquitto ACL file every ``topic`` line belongs to the ``user`` line
    above it. A user's deny lines come first in its section; mosquitto 2 checks denials
    before grants anyway, but a reader (or an older evaluator) sees at once what wins.
    """
    modes = list(modes)
    bridges = list(dict.fromkeys(bridge_users))
    revoked = sorted(set(revoked))
    rules: list[AclRule] = []
    try:
        for mode in modes:
            rules += acl_rules(mode=mode, network=network, bridge_users=bridges,
                               revoked=revoked)
    except TopicError as exc:
        raise ConfigError(str(exc)) from None
    patterns = list(dict.fromkeys(r.mosquitto() for r in rules if r.user is None))
    lines = [
        f"# pear_mqtt ACL for network {network!r} ({', '.join(modes)}), generated by",
        "# pear_mqtt.brokerconf from pear_mqtt.topics.acl_rules; do not edit by hand.",
        "# %u is the MQTT username: the client certificate's CN, i.e. the member id.",
        "# Anything not granted here is denied.",
        "",
        *patterns,
    ]
    users = list(dict.fromkeys([*bridges, *(r.user for r in rules if r.user is not None)]))
    for user in users:
        own = [r for r in rules if r.user == user]
        # A stable sort: deny lines move to the front, everything else keeps its order.
        own.sort(key=lambda r: r.access != "deny")
        if own:
            lines += [""]
            if any(r.access == "deny" for r in own):
                lines += ["# Nodes of this member whose certificate is revoked: their retained",
                          "# state stops being served (check_retain_source), nobody writes it."]
            lines += [f"user {user}", *dict.fromkeys(r.mosquitto() for r in own)]
    return "\n".join(lines) + "\n"


def _conf_path(path: Path | str, what: str) -> str:
    text = str(Path(path).resolve())
    # A newline in a path would let a value inject its own configuration lines.
    if any(c in text for c in "\r\n\x00"):
        raise ConfigError(f"{what} path {text!r} contains a line break or NUL")
    return text


def _port(value: int | None, what: str) -> int | None:
    if value is not None and not 0 < value < 65536:
        raise ConfigError(f"{what} must be between 1 and 65535, got {value}")
    return value


def _template(template_dir: Path, name: str) -> string.Template:
    path = template_dir / name
    try:
        return string.Template(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise BrokerError(f"cannot read broker template {path}: {exc.strerror or exc}") from None


def render(*, mode: Mode, network: str, out_dir: Path, ca_file: Path, cert_file: Path,
           key_file: Path, crl_file: Path, tls_port: int = 8883, plain_port: int | None = None,
           bridge_users: Sequence[str] = (), persistence: bool = True,
           persistence_dir: Path | None = None,
           acl_modes: Sequence[Mode] | None = None, bind_address: str | None = None,
           run_as: str | None = None, log_dest: str = "stderr", log_file: Path | None = None,
           log_types: Sequence[str] = _DEFAULT_LOG_TYPES,
           max_message_bytes: int = 1024 * 1024, max_queued_messages: int = 1_000_000,
           max_queued_bytes: int = 512 * 1024 * 1024, max_inflight_messages: int = 0,
           autosave_interval: int = 30, session_expiration: str = "14d",
           template_dir: Path | None = None, ca_dir: Path | None = None,
           revoked: Iterable[tuple[str, str]] | None = None) -> RenderedBroker:
    """Render ``mosquitto.conf`` and ``acl`` for a ``mode`` broker of ``network`` into
    ``out_dir``.

    - ``ca_file``, ``crl_file``: the network CA certificate and CRL (``pear-mqtt pki init``).
    - ``cert_file``, ``key_file``: the broker certificate (``pki issue --role broker``).
    - ``plain_port``: also open an unauthenticated plaintext listener. Local development and
      tests only: anyone reaching it reads and writes everything.
    - ``bridge_users``: CNs of bridge certificates, granted the bridge's ACL rights.
    - ``acl_modes``: further modes whose subtrees this broker also serves (an all-in-one
      development or test broker); production brokers serve one mode.
    - ``persistence``: keep retained messages and sessions across restarts (production
      always wants it; tests turn it off for speed).
    - ``persistence_dir``: where ``mosquitto.db`` lives (default ``out_dir/data``).
    - ``bind_address``: listen on this address only (default: every interface).
    - ``log_dest``: ``stderr`` (default: containers and systemd collect it, and it is
      unbuffered, whereas mosquitto 2.0 block-buffers ``stdout`` whenever it is a pipe or a
      file, so ``docker logs`` would lag by kilobytes), ``stdout``, ``syslog`` or ``none``;
      ``log_file`` logs to that file instead (flushed line by line).
    - ``run_as``: the ``user`` mosquitto switches to when started as root (it reads the key
      file after switching). ``"root"`` keeps root; ``None`` leaves mosquitto's default.
    - ``max_message_bytes``: the largest envelope the network allows; ``max_packet_size``
      adds room for topic and properties.
    - queue and in-flight limits: sized for syncing 100,000 retained states in one burst.
    - ``revoked``: ``(member, node)`` pairs whose topics the ACL denies, so that the broker
      stops serving the retained state and presence those nodes published before their
      certificate was revoked (see the module docstring). Default: read from the CA
      registry in ``ca_dir`` (:func:`pear_mqtt.pki.revoked_nodes`) when ``ca_dir`` is given,
      else none. After ``pki revoke``, render again and SIGHUP mosquitto.

    Returns the paths written (and the revoked nodes denied). Paths in the configuration are
    absolute.
    """
    modes = _modes(mode, acl_modes)
    try:
        validate_identifier(network, what="network")
    except TopicError as exc:
        raise ConfigError(str(exc)) from None
    _port(tls_port, "tls_port")
    _port(plain_port, "plain_port")
    if plain_port is not None and plain_port == tls_port:
        raise ConfigError(f"plain_port and tls_port must differ (both {tls_port})")
    if max_message_bytes < 1024:
        raise ConfigError(f"max_message_bytes must be at least 1024, got {max_message_bytes}")
    for name, value in (("max_queued_messages", max_queued_messages),
                        ("max_queued_bytes", max_queued_bytes),
                        ("max_inflight_messages", max_inflight_messages),
                        ("autosave_interval", autosave_interval)):
        if value < 0:
            raise ConfigError(f"{name} must not be negative, got {value}")
    for name, text in (("bind_address", bind_address), ("run_as", run_as),
                       ("log_dest", log_dest), ("session_expiration", session_expiration),
                       *(("log_types", t) for t in log_types)):
        if text is not None and (not text or any(c.isspace() for c in text)):
            raise ConfigError(f"{name} {text!r} must be one word")
    for path, what in ((ca_file, "ca_file"), (cert_file, "cert_file"), (key_file, "key_file"),
                       (crl_file, "crl_file")):
        if not Path(path).is_file():
            raise ConfigError(f"{what} {path} does not exist (see `pear-mqtt pki`)")

    out_dir = Path(out_dir)
    data_dir = Path(persistence_dir) if persistence_dir is not None else out_dir / "data"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BrokerError(f"cannot create broker directories under {out_dir}: "
                          f"{exc.strerror or exc}") from None
    conf_path, acl_path = out_dir / "mosquitto.conf", out_dir / "acl"

    tdir = Path(template_dir) if template_dir is not None else DEFAULT_TEMPLATE_DIR
    common = _template(tdir, "common.conf.tmpl")
    section = _template(tdir, f"{mode}.conf.tmpl")
    bind = f" {bind_address}" if bind_address else ""
    plain = ""
    if plain_port is not None:
        plain = (
            "\n# -- plaintext listener: DEVELOPMENT AND TESTS ONLY -----------------------------\n"
            "# No TLS, no identity, no ACL: anyone who reaches it reads and writes everything.\n"
            f"listener {plain_port}{bind}\n"
            "protocol mqtt\n"
            "allow_anonymous true\n"
        )
    try:
        mode_section = section.substitute(
            max_queued_messages=max_queued_messages, max_queued_bytes=max_queued_bytes,
            max_inflight_messages=max_inflight_messages)
        text = common.substitute(
            mode=mode, network=network,
            user_line=f"user {run_as}" if run_as else
            "# user: mosquitto's default (switches to 'mosquitto' when started as root)",
            persistence="true" if persistence else "false",
            persistence_dir=_conf_path(data_dir, "persistence_dir"),
            autosave_interval=autosave_interval, session_expiration=session_expiration,
            max_message_bytes=max_message_bytes,
            max_packet_size=max_message_bytes + _PACKET_OVERHEAD,
            mode_section=mode_section,
            log_dest=f"file {_conf_path(log_file, 'log_file')}" if log_file else log_dest,
            log_type_lines="\n".join(f"log_type {t}" for t in log_types),
            plain_listener=plain, tls_port=tls_port, bind_address=bind,
            ca_file=_conf_path(ca_file, "ca_file"), cert_file=_conf_path(cert_file, "cert_file"),
            key_file=_conf_path(key_file, "key_file"), crl_file=_conf_path(crl_file, "crl_file"),
            acl_file=_conf_path(acl_path, "acl_file"))
    except (KeyError, ValueError) as exc:
        raise BrokerError(f"broker template in {tdir} is malformed or needs an unknown "
                          f"placeholder: {exc}") from None
    if revoked is None:
        try:
            revoked = revoked_nodes(ca_dir=Path(ca_dir)) if ca_dir is not None else []
        except PKIError as exc:
            raise ConfigError(f"cannot read the revoked nodes from the CA registry: {exc}") \
                from None
    denied = tuple(sorted(set(revoked)))
    acl = acl_text(modes=modes, network=network, bridge_users=bridge_users, revoked=denied)
    try:
        acl_path.write_text(acl, encoding="utf-8")
        conf_path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise BrokerError(f"cannot write broker configuration to {out_dir}: "
                          f"{exc.strerror or exc}") from None
    return RenderedBroker(conf_path=conf_path, acl_path=acl_path, revoked=denied)


def broker_cert_in(pki_dir: Path) -> tuple[Path, Path]:
    """The one broker certificate (``broker-*.crt``) in a CA directory, and its key beside it."""
    found = sorted(pki_dir.glob("broker-*.crt"))
    if len(found) != 1:
        names = ", ".join(p.name for p in found) or "none"
        raise ConfigError(f"expected exactly one broker certificate (broker-*.crt) in {pki_dir}, "
                          f"found {names}; issue one with `pear-mqtt pki issue --role broker` "
                          "or pass --cert and --key")
    return found[0], found[0].with_suffix(".key")
