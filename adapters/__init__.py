"""Per-architecture adapters, importable as ``hieravid.adapters``."""
