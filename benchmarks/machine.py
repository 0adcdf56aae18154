"""One line describing the machine a benchmark ran on, recorded next to every number."""
from __future__ import annotations

import os
import platform
from datetime import datetime, timezone

import torch


def describe_machine() -> dict:
    cpu = platform.processor() or "unknown cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "gpu": gpu, "torch": torch.__version__,
            "python": platform.python_version(), "load_average_1m": round(os.getloadavg()[0], 2),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
