"""Triton adapter of `tensorrt_llm_bls` (NVIDIA's BLS interface): the `bayling` model's adapter, loaded
from the rendered repository's bayling/1/model.py, with its entry seen through
`bayling.model_repository.bls` (NVIDIA's tensors in and out)."""

import importlib.util
import json
from pathlib import Path

from bayling.contract import BLS_INPUTS
from bayling.errors import InvalidInput
from bayling.model_repository import bls
from bayling.model_repository import triton_io as io


def _bayling_model():
    path = Path(__file__).resolve().parents[2] / "bayling" / "1" / "model.py"
    spec = importlib.util.spec_from_file_location("bayling_entry_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TritonPythonModel


class TritonPythonModel(_bayling_model()):
    def initialize(self, args):
        super().initialize(args)
        self.entry = bls.BlsEntry(self.entry)
        policy = json.loads(args["model_config"]).get("model_transaction_policy", {})
        self.decoupled = bool(policy.get("decoupled", False))

    def _answer(self, request):
        try:
            inputs = io.read_inputs(request, BLS_INPUTS)
            bls.check_inputs(inputs)
            if not self.decoupled and io.scalar(inputs, "stream", False):
                raise InvalidInput("stream", "needs the decoupled deployment (bayling serve --decoupled true)")
        except Exception as exc:
            request.get_response_sender().send(io.error_response(exc), flags=io.pb().TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            return
        super()._answer(request)
