"""What the pipeline keeps between runs: folders sealed by a manifest of their files' digests (every stage's outputs,
the feature store's entries, a sweep's reused stages)."""
