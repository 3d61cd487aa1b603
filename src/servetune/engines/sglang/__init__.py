"""The SGLang engine adapter package: flags.py (catalogue), launch.py (argv), preflight.py,
classify.py (start-up failures) and engine.py (the Engine that ties them together).
"""

from __future__ import annotations

from servetune.engines.sglang.engine import SglangEngine

__all__ = ["SglangEngine"]
