"""Talking to a real Triton server the way any client does: tritonclient gRPC streams and
Triton's HTTP generate endpoints."""

from __future__ import annotations

import json
import queue
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import tritonclient.grpc as grpcclient

from bayling import contract


@dataclass
class Result:
    pieces: list[str] = field(default_factory=list)
    final: dict = field(default_factory=dict)      # outputs of the final response
    error: Exception | None = None

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def grpc_inputs(model: str, values: dict) -> list:
    inputs = []
    for name, array in contract.request_arrays(model, values).items():
        tensor = grpcclient.InferInput(name, list(array.shape), contract.tensor(model, name).wire_dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def grpc_stream(url: str, values: dict, model: str = "bayling", *, read_pieces: int | None = None,
                timeout: float = 120) -> Result:
    """One request over a gRPC stream. Errors come back in-band (Triton's default; its `triton_grpc_error`
    mode can crash tritonserver 2.51). With `read_pieces`, cancel the stream after that many pieces."""
    client = grpcclient.InferenceServerClient(url)
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    result = Result()
    try:
        client.async_stream_infer(model, grpc_inputs(model, values), enable_empty_final_response=True)
        while True:
            response, error = responses.get(timeout=timeout)
            if error is not None:
                result.error = error
                return result
            outputs = {o.name: response.as_numpy(o.name) for o in response.get_response().outputs}
            text = outputs.get("text_output")
            if text is not None and text.size:
                result.pieces.append(text.reshape(-1)[0].decode("utf-8"))
            if response.get_response().parameters["triton_final_response"].bool_param:
                result.final = outputs
                return result
            if read_pieces is not None and len(result.pieces) >= read_pieces:
                client.stop_stream(cancel_requests=True)
                return result
    finally:
        client.stop_stream()
        client.close()


def final_value(result: Result, name: str):
    value = result.final[name].reshape(-1)
    return value[0].decode() if value.dtype == object else value[0].item()


def http_generate(url: str, body: dict, model: str = "bayling", stream: bool = False) -> tuple[int, object]:
    """POST /v2/models/{model}/generate (or generate_stream: a list of SSE events)."""
    path = "generate_stream" if stream else "generate"
    request = urllib.request.Request(f"http://{url}/v2/models/{model}/{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            raw = response.read().decode("utf-8")
            status = response.status
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read().decode("utf-8"))
    if not stream:
        return status, json.loads(raw)
    return status, [json.loads(line[len("data: "):]) for line in raw.splitlines() if line.startswith("data: ")]


def metric(metrics_url: str, name: str) -> float:
    """Sum of a Prometheus metric over its label sets."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def chat(content: str, **kw) -> dict:
    return {"messages": json.dumps([{"role": "user", "content": content}], ensure_ascii=False), **kw}
