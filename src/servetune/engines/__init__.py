"""Engine adapters: turn params into a launch command, know each engine's flags and failure modes.

``get_engine(spec.engine)`` picks the adapter for an engine spec.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from servetune.core.spec import EngineSpec
    from servetune.engines.base import Engine


def get_engine(spec_engine: EngineSpec) -> Engine:
    """The Engine adapter for ``spec_engine`` (chosen by its ``kind``).

    Raises ValueError for a kind no adapter handles.
    """
    if spec_engine.kind == "llamacpp":
        from servetune.engines.llamacpp import LlamaCppEngine

        return LlamaCppEngine(spec_engine)
    if spec_engine.kind == "vllm":
        from servetune.engines.vllm import VllmEngine

        return VllmEngine(spec_engine)
    if spec_engine.kind == "sglang":
        from servetune.engines.sglang import SglangEngine

        return SglangEngine(spec_engine)
    raise ValueError(f"no engine adapter for kind {spec_engine.kind!r}")  # pragma: no cover
