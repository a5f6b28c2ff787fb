"""hieravid: hierarchical video-token pruning for Video LLMs."""
