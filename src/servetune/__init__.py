"""servetune: autotuner for the server flags of LLM inference engines."""
