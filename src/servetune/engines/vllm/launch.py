"""params → the ``vllm serve MODEL ...`` command line, its environment and where it answers.

Pure: builds argv lists only (no shell strings), never starts anything.
"""

from __future__ import annotations

from servetune.core.spec import VllmEngineSpec
from servetune.core.study import Params, ParamValue
from servetune.engines.base import LaunchCommand
from servetune.engines.flagcheck import render_value
from servetune.engines.vllm.flags import BOOL_FLAGS, CATALOGUE, RULES

HEALTH_PATH = "/health"
"""vLLM's OpenAI server answers 200 on /health once the engine is up (vllm/entrypoints)."""


def render_flag(name: str, value: ParamValue) -> list[str]:
    """One flag as argv items.

    Bools: ``--name`` / ``--no-name`` (argparse BooleanOptionalAction in vLLM 0.33.0);
    ``cudagraph-capture-sizes`` → ``--cudagraph-capture-sizes 1 2 4`` (nargs="+");
    others ``--name value`` (ints from integral floats, floats by repr).
    """
    name = RULES.aliases.get(name, name)
    if isinstance(value, bool) and (name in BOOL_FLAGS or name not in CATALOGUE):
        return [f"--{name}" if value else f"--no-{name}"]
    if name in RULES.list_flags and isinstance(value, str):
        return [f"--{name}", *value.replace(",", " ").split()]
    return [f"--{name}", render_value(CATALOGUE.get(name), value)]


def launch_command(spec: VllmEngineSpec, params: Params, *, host: str, port: int) -> LaunchCommand:
    """``[vllm, serve, MODEL, --host H, --port P, --served-model-name NAME, *fixed, *params]``.

    ``spec.executable`` is the ``vllm`` entry point (a name or path); fixed flags (engine.flags)
    come first in spec order, then params sorted by name; ``spec.env`` becomes the process
    environment additions (e.g. CUDA_VISIBLE_DEVICES, VLLM_* variables).
    """
    argv = [
        spec.executable,
        "serve",
        spec.model,
        "--host",
        host,
        "--port",
        str(port),
        "--served-model-name",
        spec.served_model_name,
    ]
    for name, value in spec.flags.items():
        argv += render_flag(name, value)
    for name in sorted(params):
        argv += render_flag(name, params[name])
    return LaunchCommand(argv=argv, env=dict(spec.env), host=host, port=port)
