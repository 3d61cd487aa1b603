"""Test and benchmark helpers that ship with servetune (a fake OpenAI-compatible streaming server).

Nothing here is used by a tuning study; tests and ``bench/`` import it.
"""
