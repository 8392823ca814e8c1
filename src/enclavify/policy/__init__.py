"""policy component (see docs/architecture.md)."""
