"""Stage plugins: the base API, the registry, and one module per built-in stage."""
