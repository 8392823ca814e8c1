"""cas component (see docs/architecture.md)."""
