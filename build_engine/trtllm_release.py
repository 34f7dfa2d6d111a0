"""The one place that pins the TensorRT-LLM release of the GPU path.

Why 0.17.0.post1 (sources, all read for this pin):

* TensorRT-LLM release notes (docs/source/release-notes.md, published at
  https://nvidia.github.io/TensorRT-LLM/release-notes.html):
  - 0.17.0: TensorRT 10.8.0, CUDA 12.8.0, "The base Docker image for TensorRT-LLM Backend is
    updated to nvcr.io/nvidia/tritonserver:25.01-py3"; the PyTorch workflow is still
    "an experimental feature"; the TensorRT engine flow (`convert_checkpoint.py`, `trtllm-build`)
    is the primary one. Known issue: `pip install tensorrt-llm` needs
    `--extra-index-url https://pypi.nvidia.com`.
  - 0.18.1: "The 0.18.x series of releases builds upon the 0.17.0 release, focusing exclusively
    on dependency updates without incorporating features from the previous 0.18.0.dev
    pre-releases." So 0.17.0 is the last line whose features were developed for the engine flow.
  - 1.0: "Promote PyTorch to be the default LLM backend"; "Removed legacy documentation related
    to the TensorRT workflow".
* Triton's release compatibility matrix (triton-inference-server/server,
  docs/introduction/compatibility.md, "Container Name: trtllm-python-py3"):
  `25.02 | nvcr.io/nvidia/tritonserver:25.02-trtllm-python-py3 | Python 3.12.3 | ... |
  TensorRT 10.8.0.43 | TensorRT-LLM 0.17.0.post1 | CUDA 12.8.0.038 | driver 570.86.10`
  (25.01 ships 0.17.0, 25.03 ships 0.18.0).
* tensorrtllm_backend tag v0.17.0 (the model templates and the backend source this project's
  configuration is checked against); its release branch also has
  "TensorRT-LLM backend v0.17.0.post1 release (#688)" with the same tree.
* PyPI has `tensorrt-llm==0.17.0.post1` only as a stub that installs from pypi.nvidia.com,
  which the development machines cannot reach: TensorRT-LLM runs only inside the container.
"""

from __future__ import annotations

import sys
from importlib import metadata

from bayling.errors import BaylingError

TRTLLM_VERSION = "0.17.0.post1"
# The sources checked for this pin are those of tag v0.17.0; 0.17.0.post1 repackaged it (the
# trtllm-build, plugin and LLaMA converter sources are unchanged between the two), and the
# NGC 25.01 container reports plain 0.17.0. Anything else is refused unless forced.
COMPATIBLE_VERSIONS = ("0.17.0.post1", "0.17.0")
BACKEND_TAG = "v0.17.0"                      # triton-inference-server/tensorrtllm_backend
TRITON_RELEASE = "25.02"
TRITON_IMAGE = f"nvcr.io/nvidia/tritonserver:{TRITON_RELEASE}-trtllm-python-py3"
TENSORRT_VERSION = "10.8.0.43"
CUDA_VERSION = "12.8.0.038"
MIN_DRIVER = "570.86.10"                     # the container's CUDA driver (data-center GPUs may use compat drivers)
CONTAINER_PYTHON = "3.12"

RELEASE_NOTES_URL = "https://nvidia.github.io/TensorRT-LLM/release-notes.html"
COMPATIBILITY_URL = ("https://github.com/triton-inference-server/server/blob/main/"
                     "docs/introduction/compatibility.md")
BACKEND_URL = f"https://github.com/triton-inference-server/tensorrtllm_backend/tree/{BACKEND_TAG}"

# Where the converter script lives: the LLaMA example of TensorRT-LLM's source tree
# (examples/llama/convert_checkpoint.py); it is not part of the wheel. The NGC container
# keeps TensorRT-LLM's examples under /app (the backend README of v0.17.0 runs
# `cd /app/examples/gpt` in that container); a checkout of tensorrtllm_backend v0.17.0 has it
# under tensorrt_llm/examples/llama.
CONVERT_SCRIPT_CANDIDATES = (
    "/app/examples/llama/convert_checkpoint.py",
    "/app/tensorrt_llm/examples/llama/convert_checkpoint.py",
    "tensorrt_llm/examples/llama/convert_checkpoint.py",
)


def pin_summary() -> str:
    return (f"TensorRT-LLM {TRTLLM_VERSION} (tensorrtllm_backend {BACKEND_TAG}), "
            f"container {TRITON_IMAGE}, TensorRT {TENSORRT_VERSION}, CUDA {CUDA_VERSION}")


def installed_version() -> str | None:
    """The installed TensorRT-LLM version, from the package metadata (no import, no GPU needed);
    falls back to importing `tensorrt_llm` for source installs without metadata."""
    for dist in ("tensorrt_llm", "tensorrt-llm"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    try:
        import tensorrt_llm  # noqa: F401  (heavy: loads CUDA libraries)
    except ImportError:
        return None
    return str(getattr(sys.modules["tensorrt_llm"], "__version__", "unknown"))


def check_installed_version(force: bool = False) -> str:
    """Return the installed version; refuse one other than the pin unless `force`.

    Raises BaylingError when TensorRT-LLM is not installed at all, forced or not:
    nothing can be built without it.
    """
    version = installed_version()
    if version is None:
        raise BaylingError(f"TensorRT-LLM is not installed here; run 'bayling build --target trtllm' inside "
                           f"{TRITON_IMAGE} (TensorRT-LLM {TRTLLM_VERSION}), or use --dry-run to see the plan")
    if version not in COMPATIBLE_VERSIONS:
        if not force:
            raise BaylingError(f"TensorRT-LLM {version} is installed, but this tool is written for {TRTLLM_VERSION} "
                               f"({TRITON_IMAGE}); its converter and trtllm-build options may differ. "
                               "Pass --force-version to try anyway")
        print(f"warning: TensorRT-LLM {version} is not the pinned {TRTLLM_VERSION}; continuing because of "
              "--force-version", file=sys.stderr)
    return version
