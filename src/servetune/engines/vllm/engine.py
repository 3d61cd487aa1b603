"""The vLLM Engine adapter: catalogue (flags.py), command (launch.py), pre-flight
(preflight.py) and log classifier (classify.py) behind the Engine protocol.
"""

from __future__ import annotations

from collections.abc import Mapping

from servetune.core.spec import VllmEngineSpec, Workload
from servetune.core.study import Params, ParamValue
from servetune.engines.base import LaunchCommand
from servetune.engines.flagcheck import FlagRules
from servetune.engines.gpu_engine import GpuEngine
from servetune.engines.hardware import GpuFacts, ModelFacts
from servetune.engines.logclassify import Classification
from servetune.engines.vllm import classify, flags, launch, preflight


class VllmEngine(GpuEngine):
    """vLLM's OpenAI-compatible server (``vllm serve``) as an Engine; see GpuEngine."""

    kind = "vllm"
    label = f"vLLM {flags.VERSION}"
    health_path = launch.HEALTH_PATH
    spec: VllmEngineSpec

    @property
    def rules(self) -> FlagRules:
        """vLLM 0.33.0's flag rules (flags.RULES)."""
        return flags.RULES

    def launch_command(self, params: Params, *, host: str, port: int) -> LaunchCommand:
        """``vllm serve MODEL --host H --port P --served-model-name N *fixed *params``."""
        return launch.launch_command(self.spec, params, host=host, port=port)

    def _preflight(
        self,
        flags_: Mapping[str, ParamValue | None],
        workload: Workload,
        gpus: GpuFacts,
        model: ModelFacts | None,
    ) -> list[str]:
        return preflight.check(flags_, workload, gpus, model, self.spec.env)

    def _gpus_used(self, flags_: Mapping[str, ParamValue | None]) -> int:
        """tensor × pipeline × data parallel sizes (preflight.gpus_used)."""
        return preflight.gpus_used(flags_)

    def classify(self, log_text: str, returncode: int | None) -> Classification:
        """See classify.classify_vllm_log."""
        return classify.classify_vllm_log(log_text, returncode)
