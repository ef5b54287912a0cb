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


# The instruction sets ONNX Runtime's CPU kernels choose their code and, for prepared graphs, their weight layouts by
# (an NCHWc block is 16 floats wide with AVX-512, 8 with AVX2): a model name ("AMD EPYC") spans CPUs with and without.
KERNEL_ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "asimd", "sve", "i8mm")


@cache
def cpu_features() -> tuple[str, ...]:
    """Which of KERNEL_ISA_FLAGS the kernel reports for this CPU (x86 `flags`, Arm `Features`), in that order."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return ()
    for line in cpuinfo.read_text(errors="replace").splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            present = set(value.split())
            return tuple(flag for flag in KERNEL_ISA_FLAGS if flag in present)
    return ()


def device_label(device: str) -> str:
    """What an ORT engine is tied to: the CPU model and its kernel instruction sets for CPU engines, the GPU name
    otherwise."""
    if device == "cpu":
        features = cpu_features()
        return f"cpu: {cpu_name()}" + (f" ({', '.join(features)})" if features else "")
    import torch

    if torch.cuda.is_available():
        return f"{device}: {torch.cuda.get_device_name()}"
    return f"{device}: no GPU visible"
