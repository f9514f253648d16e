"""One config per paper experiment; each imports `default` and overrides fields."""
