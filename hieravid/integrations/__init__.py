"""Integrations of hieravid with third-party tools (imported only on demand)."""
