"""Naming the machine a result was measured on (for result files and their names)."""

from __future__ import annotations

import platform
import re
from pathlib import Path

import torch


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what ``platform`` knows of it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: torch.device | str) -> str:
    """``'NVIDIA H100 80GB HBM3'`` or ``'CPU AMD EPYC ... (2 threads)'``."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    n = torch.get_num_threads()
    return f"CPU {cpu_name()} ({n} thread{'s' if n != 1 else ''})"


def slug(name: str) -> str:
    """A file-name-safe form of ``name``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:60]


def resolve_device(name: str | torch.device | None) -> torch.device:
    """The device a command runs on: ``name`` checked, or CUDA when one is present and ``name`` is None.

    Raises ``ValueError`` naming the problem and the fix for a name torch does not know (``"banana"``) or for a
    CUDA device on a machine without one (or with fewer devices than the index asks for).
    """
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {str(name)!r}: pass cpu or cuda (or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(name)!r} asked for, but this machine has no usable CUDA GPU: pass "
                             f"--device cpu (or leave --device out)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(name)!r} asked for, but this machine has {torch.cuda.device_count()} "
                             f"CUDA device(s): pass cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    elif dev.type not in ("cpu", "mps", "xpu"):
        raise ValueError(f"device {str(name)!r} is not supported by hadakit: pass cpu or cuda")
    return dev
