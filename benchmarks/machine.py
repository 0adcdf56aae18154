"""One line describing the machine a benchmark ran on, recorded next to every number; and the wait for the machine
to be idle before a timing."""
from __future__ import annotations

import os
import platform
import time
from datetime import datetime, timezone

import psutil
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


def others_cpu_share(seconds: float = 10.0) -> float:
    """The share of this machine's CPU (0 to 1, all cores together) used over `seconds` by processes outside this
    one's tree (another benchmark, a study on the other core)."""
    own = psutil.Process()
    ours = {own.pid, *(child.pid for child in own.children(recursive=True))}

    def cpu_seconds() -> dict[int, float]:
        used = {}
        for process in psutil.process_iter():
            if process.pid in ours:
                continue
            try:
                times = process.cpu_times()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            used[process.pid] = times.user + times.system
        return used

    before = cpu_seconds()
    time.sleep(seconds)
    after = cpu_seconds()
    spent = sum(after[pid] - before[pid] for pid in after.keys() & before.keys())
    return spent / (seconds * (psutil.cpu_count() or 1))


def wait_until_idle(max_minutes: float, threshold: float = 0.1) -> float:
    """Block until other processes use less than `threshold` of the CPU, checking every minute for at most
    `max_minutes`, and say what it waits for; returns the last share measured (above the threshold when the wait
    ran out, which the caller reports)."""
    deadline = time.monotonic() + max_minutes * 60
    share = others_cpu_share()
    while share >= threshold and time.monotonic() < deadline:
        left = (deadline - time.monotonic()) / 60
        print(f"waiting for an idle machine before timing: other processes use {share:.0%} of its CPU "
              f"(checking every minute, {left:.0f} min left)", flush=True)
        time.sleep(50)
        share = others_cpu_share()
    return share
