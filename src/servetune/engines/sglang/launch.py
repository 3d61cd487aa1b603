"""params → the ``python -m sglang.launch_server --model-path MODEL ...`` command line.

Pure: builds argv lists only (no shell strings), never starts anything.
"""

from __future__ import annotations

from servetune.core.spec import SglangEngineSpec
from servetune.core.study import Params, ParamValue
from servetune.engines.base import LaunchCommand
from servetune.engines.flagcheck import FlagRules, render_value

HEALTH_PATH = "/health"
"""SGLang answers 200 on /health once the server is up (/health_generate also runs a generation;
servetune's readiness check sends its own one-token generation after /health)."""

MODULE = "sglang.launch_server"


def render_flag(rules: FlagRules, name: str, value: ParamValue) -> list[str]:
    """One flag as argv items: bools are store_true (``--name`` when true, nothing when false,
    the default of every SGLang bool flag); others ``--name value``."""
    name = rules.aliases.get(name, name)
    if isinstance(value, bool):
        return [f"--{name}"] if value else []
    return [f"--{name}", render_value(rules.catalogue.get(name), value)]


def launch_command(
    spec: SglangEngineSpec, rules: FlagRules, params: Params, *, host: str, port: int
) -> LaunchCommand:
    """``[python, -m, sglang.launch_server, --model-path M, --host H, --port P,
    --served-model-name N, *fixed flags (spec order), *params (sorted)]`` with ``spec.env``."""
    argv = [
        spec.python,
        "-m",
        MODULE,
        "--model-path",
        spec.model,
        "--host",
        host,
        "--port",
        str(port),
        "--served-model-name",
        spec.served_model_name,
    ]
    for name, value in spec.flags.items():
        argv += render_flag(rules, name, value)
    for name in sorted(params):
        argv += render_flag(rules, name, params[name])
    return LaunchCommand(argv=argv, env=dict(spec.env), host=host, port=port)
