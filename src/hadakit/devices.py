"""Naming the machine a result was measured on (for result files and their names)."""

from __future__ import annotations

import platform
import re
from pathlib import Path

import torch


def device_name(device: torch.device | str) -> str:
    """``'NVIDIA H100 80GB HBM3'`` or ``'CPU AMD EPYC ... (2 threads)'``."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    n = torch.get_num_threads()
    return f"CPU {cpu} ({n} thread{'s' if n != 1 else ''})"


def slug(name: str) -> str:
    """A file-name-safe form of ``name``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:60]
