"""GPU energy per phase from NVML (``pynvml``), where a CUDA device and the library are present."""
from __future__ import annotations

import torch

__all__ = ["EnergyMeter"]


class EnergyMeter:
    """Total GPU energy in joules from NVML, or None where unavailable (CPU, no pynvml, old GPU)."""

    def __init__(self, device: torch.device):
        self.handle = None
        if device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
        except Exception:  # any NVML failure means "no energy figures", never a failed run
            self.handle = None

    def read(self) -> float | None:
        if self.handle is None:
            return None
        try:
            return self._nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) / 1000.0  # mJ -> J
        except Exception:
            return None

    def add_since(self, energy: dict, phase: str, start: float | None) -> None:
        """Add the joules used since the reading ``start`` to ``energy[phase]`` (when both are known)."""
        end = self.read()
        if start is not None and end is not None:
            energy[phase] = energy.get(phase, 0.0) + (end - start)
