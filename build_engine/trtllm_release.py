"""The one place that pins the TensorRT-LLM release of the GPU path.

Why 1.2.1 (sources, all read for this pin; build_engine/data/trtllm_1.2.1_options.json names
each file and commit):

* Triton's release compatibility matrix (triton-inference-server/server,
  docs/introduction/compatibility.md at e1db8a60, 2026-08-19, "Container Name: trtllm-python-py3"):
  `26.07 | nvcr.io/nvidia/tritonserver:26.07-trtllm-python-py3 | Python 3.12.3 |
  2.10.0a0+b4e4ee81d3.nv25.12 | 10.14.1.48 | 1.2.1 | 13.1.0.036 | 590.44.01 | 14.20 GB`;
  26.04, 26.05 and 26.06 ship the same 1.2.1 stack, 26.03 ships 1.2.0, 25.12-26.02 ship 1.1.0.
  26.07 is the newest container of the newest release line, so it is the one pinned.
* TensorRT-LLM's main branch has removed the TensorRT engine flow (docs/source/legacy/
  tensorrt-backend-removal.md: `trtllm-build`, the per-model `convert_checkpoint.py` and
  `LLM(backend="tensorrt")` are gone). 1.2 is the last release line that still ships them: its
  LLaMA converter (examples/models/core/llama/convert_checkpoint.py) already calls
  `emit_engine_arch_deprecation()`. Release notes (docs/source/release-notes.md, "TensorRT-LLM
  Release 1.2"): base image of the backend nvcr.io/nvidia/tritonserver:25.12-py3, PyTorch 2.9.1,
  transformers 4.57.3.
* The C++ `tensorrtllm` Triton backend moved from triton-inference-server/tensorrtllm_backend
  (whose last tag is v1.0.0) into TensorRT-LLM's own tree, `triton_backend/`; tensorrtllm_backend's
  main branch now only pins TensorRT-LLM release/1.2 as a submodule (9e828d3, "Update
  TensorRT-LLM submodule to release/1.2@36e34eeff"). So the backend sources are those of
  NVIDIA/TensorRT-LLM tag v1.2.1, folder triton_backend/.
* PyPI's `tensorrt-llm==1.2.1` is a stub that downloads the wheel from NVIDIA's own index, which
  the development machines cannot reach: TensorRT-LLM runs only inside the container.

The engine-free successor (the LLM API on the PyTorch backend over a Model Optimizer checkpoint,
`bayling build --target trtllm-llmapi`) is served by the same container; see llmapi_build.py.
"""

from __future__ import annotations

import json
import sys
from functools import lru_cache
from importlib import metadata, resources

from bayling.errors import BaylingError

TRTLLM_VERSION = "1.2.1"
COMPATIBLE_VERSIONS = ("1.2.1",)            # anything else is refused unless forced
BACKEND_TAG = "v1.2.1"                      # NVIDIA/TensorRT-LLM, folder triton_backend/
BACKEND_SOURCE = f"NVIDIA/TensorRT-LLM {BACKEND_TAG} triton_backend/"
TRITON_RELEASE = "26.07"
TRITON_IMAGE = f"nvcr.io/nvidia/tritonserver:{TRITON_RELEASE}-trtllm-python-py3"
TENSORRT_VERSION = "10.14.1.48"
CUDA_VERSION = "13.1.0.036"
MIN_DRIVER = "590.44.01"                    # the container's CUDA driver (data-center GPUs may use compat drivers)
CONTAINER_PYTHON = "3.12"
CONTAINER_TORCH = "2.10.0a0+b4e4ee81d3.nv25.12"
OPTIONS_FILE = f"trtllm_{TRTLLM_VERSION}_options.json"

RELEASE_NOTES_URL = "https://nvidia.github.io/TensorRT-LLM/release-notes.html"
COMPATIBILITY_URL = ("https://github.com/triton-inference-server/server/blob/main/"
                     "docs/introduction/compatibility.md")
BACKEND_URL = f"https://github.com/NVIDIA/TensorRT-LLM/tree/{BACKEND_TAG}/triton_backend"

# Where the converter script lives: the LLaMA example of TensorRT-LLM's source tree, which moved
# from examples/llama/ (0.17) to examples/models/core/llama/ and is not part of the wheel. The
# NGC container keeps TensorRT-LLM's sources under /app/tensorrt_llm (the backend docs of the 1.2
# line run `tensorrt_llm/examples/models/core/llama/convert_checkpoint.py` from a checkout of
# tensorrtllm_backend, whose tensorrt_llm/ is that submodule).
CONVERT_SCRIPT_SUBPATH = "models/core/llama/convert_checkpoint.py"   # under examples/
CONVERT_SCRIPT_CANDIDATES = (
    f"/app/tensorrt_llm/examples/{CONVERT_SCRIPT_SUBPATH}",
    f"/app/examples/{CONVERT_SCRIPT_SUBPATH}",
    f"tensorrt_llm/examples/{CONVERT_SCRIPT_SUBPATH}",
)


@lru_cache(maxsize=1)
def release_options() -> dict:
    """The option lists and config keys recorded from the pinned release (see the file's sources)."""
    text = resources.files("bayling.build_engine").joinpath("data", OPTIONS_FILE).read_text(encoding="utf-8")
    return json.loads(text)


def pin_summary() -> str:
    return (f"TensorRT-LLM {TRTLLM_VERSION} (backend {BACKEND_SOURCE}), "
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
