"""The llama.cpp engine adapter package: flags.py (catalogue), launch.py (argv), preflight.py,
gguf_info.py (model files), classify.py (start-up failures) and engine.py (the Engine).
"""

from __future__ import annotations

from servetune.engines.llamacpp.engine import LlamaCppEngine

__all__ = ["LlamaCppEngine"]
