"""Triton adapter of the ensemble's `postprocessing`; the logic is `bayling.model_repository.pre_post.Postprocessor`."""

from bayling.contract import POSTPROCESSING_INPUTS
from bayling.model_repository import triton_io as io
from bayling.model_repository.engine_text import load_engine_text
from bayling.model_repository.pre_post import Postprocessor


class TritonPythonModel:
    def initialize(self, args):
        io.exit_with_server()
        self.logic = Postprocessor(load_engine_text(io.model_parameters(args)["engine_dir"]))

    def execute(self, requests):
        return io.answer_each(requests, POSTPROCESSING_INPUTS, self.logic.process)
