"""The package's version, and what produced a figure: package versions, the machine and the date."""

from __future__ import annotations

import datetime
import functools
import platform
import subprocess
from pathlib import Path
from typing import Any

__version__ = "0.1.0"


def provenance() -> dict[str, Any]:
    """Versions, machine and date, for every figure we publish."""
    versions = {p: package_version(p) for p in ("torch", "transformers", "peft", "lm_eval")}
    return {
        "versions": {"python": platform.python_version(), **versions, "tokenforget": __version__},
        "machine": machine(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }



def package_version(pkg: str) -> str:
    import importlib.metadata as md

    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return "not installed"


def machine() -> str:
    """CPU model, core count and the widest vector instructions torch's CPU kernels use (`AVX2`, `AVX512`, ...: two
    machines of one model name can differ there, and so can their figures), and the GPU, if any."""
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
    return f"{cpu}, {os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()}{gpu}"


@functools.lru_cache(maxsize=1)
def code_commit() -> str:
    """The commit of the checkout the package runs from (`+changes` when tracked files differ from it), or
    `tokenforget <version>` for an installed copy: what a stage's `stage.json` says made it."""
    here = Path(__file__).resolve().parent
    try:
        # this file tracked by the repository around it: an installed copy inside someone's own repository is not
        tracked = subprocess.run(["git", "-C", str(here), "ls-files", "--error-unmatch", Path(__file__).name],
                                 capture_output=True, text=True, timeout=10)
        head = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if tracked.returncode != 0 or head.returncode != 0:
            return f"tokenforget {__version__}"
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no", "--", "."],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return f"tokenforget {__version__}"
    return head.stdout.strip() + ("+changes" if dirty else "")


@functools.lru_cache(maxsize=1)
def made_by() -> dict[str, str]:
    """The commit, machine and library versions a stage was made with (recorded beside its wall time)."""
    libs = ", ".join(f"{p} {package_version(p)}" for p in ("torch", "transformers", "peft", "trl"))
    return {"commit": code_commit(), "machine": machine(), "versions": libs}

