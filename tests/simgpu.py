"""A simulated ``torch.cuda`` for a CPU-only test run: N GPUs that exist only as answers.

``is_available``/``device_count``/``current_device``/``set_device``/``get_device_properties``
and the few others facecli calls report N GPUs and check their arguments with torch's own
helper (``torch.cuda._utils._get_device_index``), so an index-less ``cuda`` device is
rejected exactly where real torch rejects it. Nothing runs on a GPU: tensors on ``cuda``
still fail unless they live under ``FakeTensorMode`` (see tests/test_simulated_gpu.py).
What this cannot see: kernels, memory, speed, real streams and synchronisations, NCCL.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch.cuda._utils import _get_device_index

GIB = 1024**3


class SimulatedCuda:
    """The state of the simulated GPUs and the ``torch.cuda`` functions that read it."""

    def __init__(self, count: int = 1):
        self.count = count
        self.current = 0
        self.set_device_calls: list[int] = []
        self.memory_fraction: dict[int, float] = {}

    def _index(self, device, optional: bool = True) -> int:
        index = _get_device_index(device, optional=optional)
        if not 0 <= index < self.count:
            raise RuntimeError(f"CUDA error: invalid device ordinal {index} (simulated: {self.count} device(s))")
        return index

    def is_available(self) -> bool:
        return True

    def device_count(self) -> int:
        return self.count

    def current_device(self) -> int:
        return self.current

    def set_device(self, device) -> None:
        index = _get_device_index(device)  # as torch.cuda.set_device: no index -> ValueError
        if index >= 0:
            self.current = self._index(index)
            self.set_device_calls.append(index)

    def get_device_properties(self, device=None):
        index = self._index(device)
        return SimpleNamespace(name=f"Simulated GPU {index}", total_memory=80 * GIB, major=9, minor=0, multi_processor_count=132)

    def get_device_name(self, device=None) -> str:
        return self.get_device_properties(device).name

    def get_device_capability(self, device=None) -> tuple[int, int]:
        p = self.get_device_properties(device)
        return p.major, p.minor

    def is_bf16_supported(self, including_emulation: bool = True) -> bool:
        return True

    def set_per_process_memory_fraction(self, fraction: float, device=None) -> None:
        index = self._index(self.current if device is None else _get_device_index(device))  # as torch: optional=False
        self.memory_fraction[index] = fraction

    def synchronize(self, device=None) -> None:
        self._index(device)

    def max_memory_allocated(self, device=None) -> int:
        self._index(device)
        return 0

    def memory_allocated(self, device=None) -> int:
        self._index(device)
        return 0

    def install(self, monkeypatch) -> "SimulatedCuda":
        names = ("is_available", "device_count", "current_device", "set_device", "get_device_properties", "get_device_name",
                 "get_device_capability", "is_bf16_supported", "set_per_process_memory_fraction", "synchronize",
                 "max_memory_allocated", "memory_allocated")
        for name in names:
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))
        monkeypatch.delenv("LOCAL_RANK", raising=False)
        monkeypatch.delenv("WORLD_SIZE", raising=False)
        return self
