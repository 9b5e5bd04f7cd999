"""``pear-mqtt pki``: the certificate authority: init, issue, revoke, crl, list."""

from ..security.pki import register_cli

__all__ = ["register_cli"]
