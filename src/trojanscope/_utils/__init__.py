"""Internal helpers: hooks, batching, validation, the defence base class and registries."""
