"""tin: the toolkit's package, one sub-package per layer (docs/ARCHITECTURE.md); the root scripts and the original project's modules sit beside it."""
