"""Thin glue between Triton's Python backend (`triton_python_backend_utils`) and plain
numpy dictionaries, so that the models' logic is tested without Triton."""

from __future__ import annotations

import json
import os
import subprocess
from typing import Iterable

import numpy as np

from bayling.contract import Tensor
from bayling.errors import InvalidInput


def pb():
    import triton_python_backend_utils as pb_utils  # only inside a Triton Python backend stub

    return pb_utils


def exit_with_server(interval_s: int = 1) -> subprocess.Popen:
    """End this stub process as soon as its `tritonserver` is gone. Call once from `initialize`.

    The backend's own check can deadlock: when the server dies while a stub thread waits in a
    metric call (`Metric.set`, which holds the GIL), the stub never exits and keeps its engine's
    memory (about 1 GB for the llama.cpp engine) for ever. So the watch is a small shell process,
    which needs neither the stub's GIL nor its threads."""
    server, stub = os.getppid(), os.getpid()
    watch = (f"while kill -0 {server} && kill -0 {stub}; do sleep {interval_s}; done 2>/dev/null; "
             f"kill -9 {stub} 2>/dev/null")
    return subprocess.Popen(["sh", "-c", watch], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def read_inputs(request, tensors: Iterable[Tensor]) -> dict[str, np.ndarray]:
    pb_utils = pb()
    out = {}
    for t in tensors:
        tensor = pb_utils.get_input_tensor_by_name(request, t.name)
        if tensor is not None:
            out[t.name] = tensor.as_numpy()
    return out


def response(outputs: dict[str, np.ndarray]):
    pb_utils = pb()
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in outputs.items()])


def send(sender, outputs: dict[str, np.ndarray] | None, final: bool) -> None:
    """One response of a decoupled model (None: only close the request).

    The Tensor objects stay referenced until `send` returns: the Python backend of Triton 2.51
    releases the GIL in `send` and drops the outputs the client did not ask for there, which
    frees their numpy arrays without the GIL and corrupts the stub's heap when other threads run
    (fixed upstream in python_backend #390, "Hold GIL when deleting numpy array")."""
    pb_utils = pb()
    flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
    if outputs is None:
        sender.send(None, flags=flags)
        return
    tensors = [pb_utils.Tensor(k, v) for k, v in outputs.items()]
    sender.send(pb_utils.InferenceResponse(output_tensors=tensors), flags=flags)
    del tensors


def error_response(exc: BaseException):
    """INVALID_ARG for bad input (gRPC INVALID_ARGUMENT, HTTP 400), INTERNAL otherwise."""
    pb_utils = pb()
    code = pb_utils.TritonError.INVALID_ARG if isinstance(exc, InvalidInput) else pb_utils.TritonError.INTERNAL
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(exc), code))


def answer_each(requests, tensors: Iterable[Tensor], process) -> list:
    """For the non-decoupled models: one response (or error response) per request."""
    responses = []
    for request in requests:
        try:
            responses.append(response(process(read_inputs(request, tensors))))
        except Exception as exc:
            responses.append(error_response(exc))
    return responses


def model_parameters(args: dict) -> dict[str, str]:
    config = json.loads(args["model_config"])
    return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


# --- reading request values (every tensor here carries Triton's batch dimension)

def scalar(inputs: dict[str, np.ndarray], name: str, default=None):
    value = inputs.get(name)
    if value is None or value.size == 0:
        return default
    if value.size != 1:
        raise InvalidInput(name, f"must hold one value per request, got shape {list(value.shape)}")
    item = value.reshape(-1)[0]
    return item.item() if isinstance(item, np.generic) else item


def text(inputs: dict[str, np.ndarray], name: str) -> str | None:
    value = scalar(inputs, name)
    if value is None:
        return None
    if isinstance(value, str):
        return value
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput(name, f"is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None


def texts(inputs: dict[str, np.ndarray], name: str) -> list[str]:
    value = inputs.get(name)
    if value is None:
        return []
    out = []
    for item in value.reshape(-1):
        try:
            out.append(item.decode("utf-8") if isinstance(item, bytes) else str(item))
        except UnicodeDecodeError as exc:
            raise InvalidInput(name, f"is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    return [s for s in out if s]


def bytes_array(values: list[str]) -> np.ndarray:
    return np.array([[v.encode("utf-8") for v in values]], dtype=np.object_)
