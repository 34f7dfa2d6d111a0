"""Where the tools keep things by default (override with BAYLING_CACHE)."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    return Path(os.environ.get("BAYLING_CACHE") or Path.home() / ".cache" / "bayling")


# `bayling build --target` -> the folder suffix of the default model's engine
DEFAULT_ENGINE_SUFFIX = {"cpu": "q8_0", "cpu-ct2": "int8"}


def default_engine_dir(target: str = "cpu") -> Path:
    """The CPU INT8 engine of the embedded default model (`bayling build --default [--target cpu-ct2]`):
    llama.cpp Q8_0 by default, CTranslate2 INT8 with cpu-ct2."""
    return cache_dir() / "engines" / f"{DEFAULT_MODEL_NAME}-{DEFAULT_ENGINE_SUFFIX[target]}"
