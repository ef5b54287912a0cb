"""Identity of the machine an engine is built for (the manifest records it; loading checks it)."""

from __future__ import annotations

import platform
from functools import cache
from pathlib import Path


@cache
def cpu_name() -> str:
    """The CPU model as the kernel reports it (e.g. 'Intel(R) Xeon(R) Platinum 8488C')."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_label(device: str) -> str:
    """What an ORT engine is tied to: the CPU model for CPU engines, the GPU name otherwise."""
    if device == "cpu":
        return f"cpu: {cpu_name()}"
    import torch

    if torch.cuda.is_available():
        return f"{device}: {torch.cuda.get_device_name()}"
    return f"{device}: no GPU visible"
