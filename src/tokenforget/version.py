"""The package's version, and what produced a figure: package versions, the machine and the date."""

from __future__ import annotations

import datetime
import platform
from pathlib import Path
from typing import Any

__version__ = "0.1.0"


def provenance() -> dict[str, Any]:
    """Versions, machine and date, for every figure we publish."""
    import importlib.metadata as md

    def version(pkg: str) -> str:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "not installed"

    from tokenforget.version import __version__

    versions = {p: version(p) for p in ("torch", "transformers", "peft", "lm_eval")}
    return {
        "versions": {"python": platform.python_version(), **versions, "tokenforget": __version__},
        "machine": machine(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }



def machine() -> str:
    """CPU model and core count (and the GPU, if any)."""
    import os

    import torch

    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores{gpu}"
