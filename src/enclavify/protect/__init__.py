"""protect component (see docs/architecture.md)."""
