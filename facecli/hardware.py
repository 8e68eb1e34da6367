"""Device names and numeric precision: what the engine, evaluation and commands all need,
kept below all of them (nothing of facecli but its errors; torch only when called).

Which device a name resolves to is :func:`facecli.engine.device.resolve_device`.
"""

from __future__ import annotations

from facecli.errors import UserError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")  # what --device accepts (N: a CUDA device index)
DEVICE_HELP = "auto, cpu, cuda or cuda:N"


def is_device_name(name: str) -> bool:
    """``name`` is one of :data:`DEVICE_CHOICES`; whether it is a device here is checked when resolved."""
    return name in DEVICE_CHOICES[:3] or name.startswith("cuda:")


def amp_dtype(device: "torch.device | str", enabled: bool = True, choice: str = "auto") -> "torch.dtype | None":
    """bf16 where the GPU computes it natively (Ampere and later), else fp16; None (fp32) on the CPU or with amp off.

    An emulated bf16 (pre-Ampere GPUs report it as supported) is slower than fp32 there.
    ``choice`` ("bf16"/"fp16") overrides the automatic pick.
    """
    import torch

    device = torch.device(device)
    if not enabled or device.type != "cuda":
        return None
    if choice == "bf16":
        if not torch.cuda.is_bf16_supported(including_emulation=False):
            raise UserError("--amp-dtype bf16: this GPU has no native bf16.", hint="Use --amp-dtype fp16 or auto.")
        return torch.bfloat16
    if choice == "fp16":
        return torch.float16
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
