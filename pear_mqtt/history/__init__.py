"""Verified history: each node's published messages as an append-only, signed Merkle log
(RFC 9162), so that receivers can prove what they hold complete and repair gaps."""
