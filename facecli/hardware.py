"""Device names and numeric precision: what the engine, evaluation and commands all need,
kept below all of them (this module imports torch and nothing of facecli but errors).

Which device a name resolves to is :func:`facecli.engine.device.resolve_device`.
"""

from __future__ import annotations

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")  # what --device accepts (N: a CUDA device index)
DEVICE_HELP = "auto, cpu, cuda or cuda:N"


def is_device_name(name: str) -> bool:
    """``name`` is one of :data:`DEVICE_CHOICES`; whether it is a device here is checked when resolved."""
    return name in DEVICE_CHOICES[:3] or name.startswith("cuda:")
