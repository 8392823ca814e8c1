"""secrets component (see docs/architecture.md)."""
