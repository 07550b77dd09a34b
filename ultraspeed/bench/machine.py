"""What machine a benchmark ran on, recorded next to every number it reports."""

from __future__ import annotations

import os
import platform
import statistics
from datetime import datetime, timezone


def describe_machine() -> dict:
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    info = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": "cpu",
    }
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
    try:
        info["load_average"] = os.getloadavg()[0]
    except OSError:
        pass
    return info


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0
