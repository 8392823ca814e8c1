"""image component (see docs/architecture.md)."""
