"""Transparency (audit) log: RFC 6962 Merkle log of security events with Ed25519-signed checkpoints."""
