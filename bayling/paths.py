"""Where the tools keep things by default (override with BAYLING_CACHE)."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    return Path(os.environ.get("BAYLING_CACHE") or Path.home() / ".cache" / "bayling")


def default_engine_dir() -> Path:
    """The CPU INT8 engine of the embedded default model (`bayling build --default`)."""
    return cache_dir() / "engines" / f"{DEFAULT_MODEL_NAME}-int8"
