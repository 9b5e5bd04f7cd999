"""Identity and trust: the CA, what a certificate names, signed and sealed envelopes."""
