"""read_gpus against recorded NVML answers (tests/fake_nvml.py) and the real pynvml here; host_facts.

Checks unit conversions, unsupported readings as None, no driver as [], and that it never raises.
"""

from __future__ import annotations

import ctypes.util

import pynvml
import pytest

from servetune.cluster.models import GPUInfo
from servetune.worker.gpu import host_facts, read_gpus
from tests.fake_nvml import RecordedNvml


def test_two_h100s_are_read_with_their_units_converted() -> None:
    nvml = RecordedNvml.load("h100x2")
    gpus = read_gpus(nvml)
    assert gpus == [
        GPUInfo(
            index=0,
            name="NVIDIA H100 80GB HBM3",
            uuid="GPU-5a8f3c0e-9b1d-4e47-a2c6-7d3e91f0b842",
            memory_total_gib=79.647,  # 85520809984 B = 81559 MiB
            memory_used_gib=0.498,
            memory_free_gib=79.149,
            utilization_pct=0.0,
            temperature_c=31.0,
            power_w=69.876,  # 69876 mW
        ),
        GPUInfo(
            index=1,
            name="NVIDIA H100 80GB HBM3",
            uuid="GPU-c41e77a2-08d5-4f3b-9e6a-15b2f8d0c3a9",
            memory_total_gib=79.647,
            memory_used_gib=74.934,
            memory_free_gib=4.714,
            utilization_pct=97.0,
            temperature_c=64.0,
            power_w=612.457,
        ),
    ]
    assert nvml.calls[0] == "nvmlInit" and nvml.calls[-1] == "nvmlShutdown"
    # what a heartbeat carries round-trips through JSON as itself
    assert [GPUInfo.model_validate_json(g.model_dump_json()) for g in gpus] == gpus


def test_unsupported_readings_are_none_and_a_lost_gpu_is_left_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    nvml = RecordedNvml.load("errors")
    gpus = read_gpus(nvml)
    assert len(gpus) == 1
    a100 = gpus[0]
    assert (a100.name, a100.memory_total_gib) == ("NVIDIA A100-SXM4-40GB", 40.0)
    assert (a100.utilization_pct, a100.temperature_c, a100.power_w) == (None, None, None)
    assert "GPU 1 left out" in caplog.text and "GPU is lost" in caplog.text
    assert nvml.calls[-1] == "nvmlShutdown" and not nvml.initialised


def test_no_driver_means_no_gpus() -> None:
    nvml = RecordedNvml.load("no_driver")
    with pytest.raises(pynvml.NVMLError_DriverNotLoaded):
        nvml.nvmlInit()  # the recorded answer is pynvml's own error class
    assert read_gpus(nvml) == []


def test_the_real_bindings_on_this_host_never_raise() -> None:
    gpus = read_gpus()
    assert all(isinstance(g, GPUInfo) for g in gpus)
    if ctypes.util.find_library("nvidia-ml") is None:
        assert gpus == []  # NVMLError_LibraryNotFound, taken as "no GPUs"


class _Broken(RecordedNvml):
    def nvmlDeviceGetCount(self) -> int:
        raise RuntimeError("driver returned garbage")


def test_any_failure_gives_no_gpus_and_still_shuts_nvml_down() -> None:
    nvml = _Broken(RecordedNvml.load("h100x2").answers)
    assert read_gpus(nvml) == []
    assert nvml.calls[-1] == "nvmlShutdown"


def test_host_facts() -> None:
    cpus, total_gib, available_gib = host_facts()
    assert cpus >= 1
    assert 0 < available_gib <= total_gib < 1e5
