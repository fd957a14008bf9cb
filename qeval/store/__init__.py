"""The result store: immutable records keyed by a content hash, and garbage collection of cached artifacts."""
