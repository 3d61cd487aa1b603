"""The vLLM engine adapter package: flags.py (catalogue), launch.py (argv), preflight.py,
classify.py (start-up failures) and engine.py (the Engine that ties them together).
"""

from __future__ import annotations

from servetune.engines.vllm.engine import VllmEngine

__all__ = ["VllmEngine"]
