"""Backends: tiers, instances, the upstream HTTP client, tokenization and the vLLM simulator."""
