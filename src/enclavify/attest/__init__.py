"""attest component (see docs/architecture.md)."""
