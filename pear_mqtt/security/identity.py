"""Who a certificate names: the identity scheme shared by the CA, brokers and receivers.

Subjects are ``CN=<member>, OU=<node>, O=<network>``: the member (company id or its network
pseudonym, which brokers take as the MQTT username), the node (store) and the network id.
Broker and bridge certificates carry their role (``broker``, ``bridge``) in ``OU``.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID

from ..errors import PKIError
from ..model.topics import validate_identifier

__all__ = ["Identity", "identity_of", "subject_for"]


@dataclass(frozen=True, slots=True)
class Identity:
    """The (network, member, node) a certificate vouches for."""

    network: str
    member: str
    node: str

    @property
    def sender(self) -> str:
        """The ``sender`` an envelope signed by this identity must carry."""
        return f"{self.member}/{self.node}"


def subject_for(*, network: str, member: str, node: str) -> x509.Name:
    """The certificate subject for an identity (each part validated as a topic level)."""
    validate_identifier(network, what="network_id")
    validate_identifier(member, what="member")
    validate_identifier(node, what="node_id")
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, network),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, node),
        x509.NameAttribute(NameOID.COMMON_NAME, member),
    ])


def _one(name: x509.Name, oid: x509.ObjectIdentifier, label: str) -> str:
    attrs = name.get_attributes_for_oid(oid)
    if len(attrs) != 1:
        raise PKIError(f"certificate subject must hold exactly one {label}, found {len(attrs)}")
    value = attrs[0].value
    if not isinstance(value, str):
        raise PKIError(f"certificate subject {label} is not text")
    return value


def identity_of(cert: x509.Certificate) -> Identity:
    """Read the identity a certificate names; :class:`PKIError` if it does not fit the scheme."""
    subject = cert.subject
    identity = Identity(
        network=_one(subject, NameOID.ORGANIZATION_NAME, "O (network)"),
        member=_one(subject, NameOID.COMMON_NAME, "CN (member)"),
        node=_one(subject, NameOID.ORGANIZATIONAL_UNIT_NAME, "OU (node)"),
    )
    try:
        validate_identifier(identity.network, what="certificate O")
        validate_identifier(identity.member, what="certificate CN")
        validate_identifier(identity.node, what="certificate OU")
    except ValueError as exc:
        raise PKIError(str(exc)) from None
    return identity
