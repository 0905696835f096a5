"""Storage tiers: the backend interface, the storage manager and the built-in tiers."""
