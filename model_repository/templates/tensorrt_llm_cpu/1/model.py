"""Triton adapter of the CPU engine model `tensorrt_llm`; the logic is
`bayling.model_repository.engine_ct2` (generation, batching) and `engine_io` (tensors)."""

from pathlib import Path

import triton_python_backend_utils as pb_utils

from bayling.contract import ENGINE_INPUTS
from bayling.manifest import ENGINE_SUBDIRS
from bayling.model_repository import engine_io
from bayling.model_repository import triton_io as io
from bayling.model_repository.engine_ct2 import Ct2Engine

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args):
        params = io.model_parameters(args)
        self.engine = Ct2Engine(str(Path(params["engine_dir"]) / ENGINE_SUBDIRS["ctranslate2"]),
                                max_batch_size=int(params["max_batch_size"]),
                                intra_threads=int(params["intra_threads"]))
        self.exclude_input = params["exclude_input_in_output"] == "true"

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                inputs = io.read_inputs(request, ENGINE_INPUTS)
                if engine_io.is_stop_request(inputs):
                    self.engine.stop(request.request_id())
                    sender.send(flags=FINAL)
                    continue
                req, include_input = engine_io.engine_request(inputs, request.request_id(), self.exclude_input)
                self.engine.submit(req, self._sink(sender, req.input_ids if include_input else []), sender.is_cancelled)
            except Exception as exc:
                sender.send(io.error_response(exc), flags=FINAL)
        return None

    @staticmethod
    def _sink(sender, prefix_ids):
        def send(emission):
            if emission.error is not None:
                sender.send(io.error_response(emission.error), flags=FINAL)
            else:
                sender.send(io.response(engine_io.engine_outputs(emission, prefix_ids)),
                            flags=FINAL if emission.final else 0)
        return send

    def finalize(self):
        self.engine.shutdown()
