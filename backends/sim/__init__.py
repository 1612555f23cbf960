"""A vLLM-compatible simulator of Qwen3 tiers: API, engine timing, KV and prefix cache."""
