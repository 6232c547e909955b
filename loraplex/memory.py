"""What memory a device has left: the engine fits its batch and adapter slots to it, the loader its CPU copies."""

import os

import torch


def available_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on `device` (free GPU memory, or available RAM)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:  # MemAvailable counts the page cache the kernel would give back; "free" pages alone do not
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
