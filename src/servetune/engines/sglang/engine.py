"""The SGLang Engine adapter: catalogue (flags.py), command (launch.py), pre-flight
(preflight.py) and log classifier (classify.py) behind the Engine protocol.
"""

from __future__ import annotations

from collections.abc import Mapping

from servetune.core.spec import SglangEngineSpec, Workload
from servetune.core.study import Params, ParamValue
from servetune.engines.base import LaunchCommand
from servetune.engines.flagcheck import FlagRules
from servetune.engines.gpu_engine import GpuEngine
from servetune.engines.hardware import GpuFacts, ModelFacts
from servetune.engines.logclassify import Classification
from servetune.engines.sglang import classify, flags, launch, preflight


class SglangEngine(GpuEngine):
    """SGLang's server (``python -m sglang.launch_server``) as an Engine; see GpuEngine.

    The flag rules follow ``engine.version`` (flags.rules_for).
    """

    kind = "sglang"
    label = "SGLang"
    health_path = launch.HEALTH_PATH
    spec: SglangEngineSpec

    @property
    def rules(self) -> FlagRules:
        """The rules of ``engine.version`` (0.5.23's by default)."""
        return flags.rules_for(self.spec.version)

    def launch_command(self, params: Params, *, host: str, port: int) -> LaunchCommand:
        """``python -m sglang.launch_server --model-path M --host H --port P ... *params``."""
        return launch.launch_command(self.spec, self.rules, params, host=host, port=port)

    def _preflight(
        self,
        flags_: Mapping[str, ParamValue | None],
        workload: Workload,
        gpus: GpuFacts,
        model: ModelFacts | None,
    ) -> list[str]:
        return preflight.check(flags_, workload, gpus, model, self.spec.env)

    def _gpus_used(self, flags_: Mapping[str, ParamValue | None]) -> int:
        """tp × pp (× dp unless enable-dp-attention) (preflight.gpus_used)."""
        return preflight.gpus_used(flags_)

    def classify(self, log_text: str, returncode: int | None) -> Classification:
        """See classify.classify_sglang_log (with this release's CUDA graph flag)."""
        return classify.classify_sglang_log(log_text, returncode, flags.graph_flag(self.rules))
