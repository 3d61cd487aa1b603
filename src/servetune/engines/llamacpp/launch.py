"""params → the ``llama-server ...`` command line: argv for launch and for the user's own build,
and the xllamacpp stand-in that takes the same flags.
"""

from __future__ import annotations

from collections.abc import Mapping

from servetune.core.study import ParamValue
from servetune.engines.llamacpp.flags import _BOOL_FORMS, CATALOGUE

XLLAMACPP = "xllamacpp"
"""``engine.binary`` that selects the wheel (module ``SERVER_MODULE``)."""

SERVER_MODULE = "servetune.engines.xllamacpp_server"

STAND_IN = f"python -m {SERVER_MODULE}"
"""The test stand-in: llama-server's flags served by the xllamacpp wheel."""

STAND_IN_NOTE = f"(to try it on this machine without llama.cpp, `{STAND_IN}` takes the same flags)"
"""The one line that names the stand-in, only as a way to try the command locally."""


def render_flag(name: str, value: ParamValue) -> list[str]:
    """One flag as argv items: ``["--name", "value"]``; bools by the catalogue's forms."""
    if isinstance(value, bool):
        if name == "flash-attn":
            return ["--flash-attn", "on" if value else "off"]
        if name in CATALOGUE and CATALOGUE[name].type != "bool":
            return [f"--{name}", "on" if value else "off"]
        on, off = _BOOL_FORMS.get(name, (f"--{name}", None))
        form = on if value else off
        return [form] if form else []
    info = CATALOGUE.get(name)
    if isinstance(value, float) and value.is_integer() and info is not None and info.type == "int":
        value = int(value)
    if isinstance(value, float):
        return [f"--{name}", repr(value)]
    return [f"--{name}", str(value)]


def _load_mode(mlock: ParamValue | None, mmap: ParamValue | None) -> str:
    """--load-mode for the older --mlock / --no-mmap pair (llama-server's --load-mode help:
    mmap, mlock, mmap+mlock, none)."""
    mapped = mmap is not False
    if mlock is True:
        return "mmap+mlock" if mapped else "mlock"
    return "mmap" if mapped else "none"


def user_flags(flags: Mapping[str, ParamValue], order: list[str] | None = None) -> list[str]:
    """``flags`` as argv for current llama-server, in ``order`` (default: as given).

    Like ``render_flag``, except that ``mlock`` and ``mmap`` (gone from current llama-server)
    become one ``--load-mode`` (an explicit load-mode wins); nothing is printed for them when
    they keep llama-server's defaults."""
    names = list(dict.fromkeys(order if order is not None else flags))
    argv: list[str] = []
    legacy = {n: flags[n] for n in ("mlock", "mmap") if n in flags}
    for name in names:
        if name in ("mlock", "mmap"):
            if name != next(n for n in names if n in legacy) or "load-mode" in flags:
                continue
            mode = _load_mode(legacy.get("mlock"), legacy.get("mmap"))
            if mode != "mmap":  # mmap is what llama-server's auto mode does on a CPU
                argv += ["--load-mode", mode]
            continue
        argv += render_flag(name, flags[name])
    return argv
