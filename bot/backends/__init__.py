"""Model backends: thin HTTP clients that yield typed chunks and raise typed errors."""
