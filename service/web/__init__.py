"""The HTTP layer: it only calls the core (scheduler, store, lifecycle)."""
