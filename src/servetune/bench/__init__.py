"""Benchmark clients: drive an OpenAI-compatible endpoint with streaming traffic and time every token."""
