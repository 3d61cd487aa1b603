"""GPU and host facts of a worker: NVML through nvidia-ml-py (``pynvml``), CPU and memory through psutil.

Reading never raises: a host without an NVIDIA driver (or without the library) has no GPUs.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import psutil
from pydantic import ValidationError

from servetune.cluster.models import GPUInfo

logger = logging.getLogger(__name__)

GIB = 2**30
"""Bytes per GiB."""


def _import_pynvml() -> Any:
    try:
        import pynvml
    except ImportError as e:
        logger.debug("nvidia-ml-py is not importable (%s): no GPUs", e)
        return None
    return pynvml


def _gib(n_bytes: int) -> float:
    return round(n_bytes / GIB, 3)


def _optional(nvml: Any, what: str, index: int, read: Any) -> Any:
    """``read()``, or None when NVML cannot give that reading for this device."""
    try:
        return read()
    except nvml.NVMLError as e:
        level = logging.DEBUG if isinstance(e, nvml.NVMLError_NotSupported) else logging.INFO
        logger.log(level, "GPU %d: no %s reading (NVML: %s)", index, what, e)
        return None


def _device(nvml: Any, index: int) -> GPUInfo:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    utilization = _optional(
        nvml, "utilisation", index, lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu
    )
    temperature = _optional(
        nvml,
        "temperature",
        index,
        lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU),
    )
    power_mw = _optional(nvml, "power", index, lambda: nvml.nvmlDeviceGetPowerUsage(handle))
    if utilization is not None and not 0 <= utilization <= 100:
        utilization = None  # NVML's "invalid" sentinels are huge unsigned values
    return GPUInfo(
        index=index,
        name=str(nvml.nvmlDeviceGetName(handle)),
        uuid=str(nvml.nvmlDeviceGetUUID(handle)),
        memory_total_gib=_gib(memory.total),
        memory_used_gib=_gib(memory.used),
        memory_free_gib=_gib(memory.free),
        utilization_pct=None if utilization is None else float(utilization),
        temperature_c=None if temperature is None else float(temperature),
        power_w=None if power_mw is None else round(power_mw / 1000, 3),
    )


def read_gpus(nvml: Any = None) -> list[GPUInfo]:
    """Every NVIDIA GPU of this host as NVML reports it now; ``[]`` when there is none.

    ``nvml`` is the ``pynvml`` module of nvidia-ml-py (imported when None) or an object with the
    same functions and error classes (tests pass recorded answers). Per device: name, UUID, memory
    (``nvmlDeviceGetMemoryInfo``, bytes → GiB of 2**30 bytes), GPU utilisation % over NVML's last
    sample period (``nvmlDeviceGetUtilizationRates().gpu``), core temperature °C
    (``nvmlDeviceGetTemperature(h, NVML_TEMPERATURE_GPU)``) and power draw
    (``nvmlDeviceGetPowerUsage``, mW → W). A reading the device does not support
    (``NVMLError_NotSupported``, e.g. utilisation on a MIG instance) or cannot give is None. A
    device whose name, UUID or memory cannot be read is left out (logged at WARNING).

    Never raises: no library, no driver (``NVMLError_LibraryNotFound``/``DriverNotLoaded``), no
    device or any other failure gives ``[]`` (logged). Calls ``nvmlInit`` and ``nvmlShutdown``
    around the reading. Sources: NVML API reference, "Device Queries"
    (https://docs.nvidia.com/deploy/nvml-api/group__nvmlDeviceQueries.html) and nvidia-ml-py
    (https://pypi.org/project/nvidia-ml-py/).
    """
    if nvml is None:
        nvml = _import_pynvml()
        if nvml is None:
            return []
    try:
        nvml.nvmlInit()
    except Exception as e:
        logger.debug("NVML is not available (%s: %s): no GPUs", type(e).__name__, e)
        return []
    gpus: list[GPUInfo] = []
    try:
        count = int(nvml.nvmlDeviceGetCount())
        for index in range(count):
            try:
                gpus.append(_device(nvml, index))
            except (nvml.NVMLError, ValidationError, ValueError, TypeError, AttributeError) as e:
                logger.warning("GPU %d left out: it could not be read (%s)", index, e)
    except Exception as e:
        logger.warning("reading the GPUs through NVML failed (%s: %s)", type(e).__name__, e)
        return []
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception as e:
            logger.debug("nvmlShutdown failed: %s", e)
    return gpus


def host_facts() -> tuple[int, float, float]:
    """``(cpu_count, memory_total_gib, memory_available_gib)`` of this host (psutil).

    ``cpu_count`` is the logical cores (at least 1); memory in GiB (2**30 bytes), "available" as
    psutil defines it (what can be given to processes without swapping).
    """
    memory = psutil.virtual_memory()
    return (usable_cpu_count(), _gib(memory.total), _gib(memory.available))


def usable_cpu_count() -> int:
    """The logical cores this process may run on (its CPU affinity, e.g. set by ``taskset`` or
    ``servetune worker --cpus``), else all of the host's; at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity on this platform
        return psutil.cpu_count(logical=True) or 1


MAX_CPU_INDEX = 65_535
"""Largest core number ``parse_cpu_list`` accepts."""


def parse_cpu_list(text: str) -> set[int]:
    """Core numbers from a list as ``taskset -c`` writes it: ``0-3``, ``0,2,4``, ``0-1,6``.

    Raises ValueError naming the bad part (empty list, not a number, a range that runs
    backwards, a core above ``MAX_CPU_INDEX``).
    """
    cores: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        low, dash, high = part.partition("-")
        try:
            first, last = int(low), int(high if dash else low)
        except ValueError:
            raise ValueError(
                f"{part!r} is not a core number or range; write e.g. 0-3 or 0,2,4"
            ) from None
        if first < 0 or last < first or last > MAX_CPU_INDEX:
            raise ValueError(f"{part!r} is not a range of core numbers (0 ≤ first ≤ last)")
        cores.update(range(first, last + 1))
    if not cores:
        raise ValueError("no core given; write e.g. 0-3 or 0,2,4")
    return cores


def pin_cpus(cores: set[int]) -> None:
    """Restrict this process (and the engines it starts, which inherit it) to ``cores``.

    Raises ValueError when the host has none of them or the platform cannot pin processes.
    """
    try:
        available = os.sched_getaffinity(0)
    except (AttributeError, OSError) as e:
        raise ValueError(f"this platform cannot pin a process to cores ({e})") from None
    missing = sorted(cores - available)
    if missing:
        raise ValueError(
            f"core(s) {', '.join(map(str, missing[:8]))} are not available to this process "
            f"(it may use {_compact(available)})"
        )
    os.sched_setaffinity(0, cores)


def _compact(cores: set[int]) -> str:
    ordered = sorted(cores)
    parts: list[str] = []
    start = prev = ordered[0]
    for c in [*ordered[1:], -2]:
        if c == prev + 1:
            prev = c
            continue
        parts.append(f"{start}-{prev}" if prev > start else str(start))
        start = prev = c
    return ",".join(parts)
