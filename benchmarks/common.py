"""Shared by the benchmark scripts: the facts every final JSON line records."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import torch
import transformers


def run_facts() -> dict:
    """What was run, where, and how busy the machine was."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {"command": " ".join([os.path.basename(sys.executable)] + sys.argv), "commit": commit or None,
            "loadavg": os.getloadavg(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}
