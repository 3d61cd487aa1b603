"""A stand-in for nvidia-ml-py's ``pynvml`` that replays recorded NVML answers (tests/fixtures/nvml).

Same function names, constants and error classes as pynvml, so ``read_gpus(nvml=…)`` runs its real code.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pynvml

FIXTURES = Path(__file__).parent / "fixtures" / "nvml"
"""Folder of the recorded answer files (``h100x2.json``, ``errors.json``, ``no_driver.json``)."""


class RecordedNvml:
    """Answers pynvml's calls from one recorded file; ``calls`` lists the function names called.

    The file holds ``nvmlInit`` (null, or an error) and ``devices``: per device, the answer of each
    ``nvmlDevice*`` query by function name. An answer ``{"nvml_error": "NVML_ERROR_…"}`` raises
    ``pynvml.NVMLError`` of that code, which pynvml turns into its subclass (e.g.
    ``NVMLError_NotSupported``), exactly as the real bindings do. Handles are device indices.
    """

    NVMLError = pynvml.NVMLError
    NVMLError_NotSupported = pynvml.NVMLError_NotSupported
    NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU

    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers = answers
        self.calls: list[str] = []
        self.initialised = False

    @classmethod
    def load(cls, name: str) -> RecordedNvml:
        """The fake for ``tests/fixtures/nvml/<name>.json``."""
        return cls(json.loads((FIXTURES / f"{name}.json").read_text()))

    def _answer(self, value: Any) -> Any:
        if isinstance(value, dict) and "nvml_error" in value:
            raise pynvml.NVMLError(getattr(pynvml, value["nvml_error"]))
        return value

    def _device(self, function: str, handle: int) -> Any:
        self.calls.append(function)
        if not self.initialised:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)
        return self._answer(self.answers["devices"][handle][function])

    def nvmlInit(self) -> None:
        self.calls.append("nvmlInit")
        self._answer(self.answers.get("nvmlInit"))
        self.initialised = True

    def nvmlShutdown(self) -> None:
        self.calls.append("nvmlShutdown")
        if not self.initialised:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)
        self.initialised = False

    def nvmlDeviceGetCount(self) -> int:
        self.calls.append("nvmlDeviceGetCount")
        return len(self.answers["devices"])

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        self.calls.append("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < len(self.answers["devices"]):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return index

    def nvmlDeviceGetName(self, handle: int) -> str:
        return str(self._device("nvmlDeviceGetName", handle))

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return str(self._device("nvmlDeviceGetUUID", handle))

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(**self._device("nvmlDeviceGetMemoryInfo", handle))

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(**self._device("nvmlDeviceGetUtilizationRates", handle))

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        if sensor != pynvml.NVML_TEMPERATURE_GPU:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return int(self._device("nvmlDeviceGetTemperature", handle))

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        return int(self._device("nvmlDeviceGetPowerUsage", handle))
