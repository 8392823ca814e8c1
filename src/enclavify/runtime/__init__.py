"""runtime component (see docs/architecture.md)."""
