"""Triton adapter of the ensemble's `preprocessing`; the logic is `bayling.model_repository.pre_post.Preprocessor`."""

from bayling.contract import PREPROCESSING_INPUTS
from bayling.model_repository import triton_io as io
from bayling.model_repository.engine_text import load_engine_text
from bayling.model_repository.pre_post import Preprocessor


class TritonPythonModel:
    def initialize(self, args):
        io.exit_with_server()
        self.logic = Preprocessor(load_engine_text(io.model_parameters(args)["engine_dir"]))

    def execute(self, requests):
        return io.answer_each(requests, PREPROCESSING_INPUTS, self.logic.process)
