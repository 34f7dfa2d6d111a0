"""Triton adapter of the `bayling` entry model; the logic is `bayling.model_repository.entry`.

Each request runs in a worker thread: it calls the engine model `tensorrt_llm` through
business-logic scripting (decoupled) and hands the text to the instance's relay thread, which
sends the responses (merged when it is behind) and polls cancellation.
"""

import logging
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils

from bayling.contract import ENGINE_MODEL, ENTRY_INPUTS
from bayling.errors import BaylingError, InvalidInput
from bayling.model_repository import triton_io as io
from bayling.model_repository.engine_text import load_engine_text
from bayling.model_repository.entry import Answer, Entry
from bayling.model_repository.relay import Relay

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
log = logging.getLogger("bayling")


class TritonPythonModel:
    def initialize(self, args):
        io.exit_with_server()
        params = io.model_parameters(args)
        self.entry = Entry(load_engine_text(params["engine_dir"]), int(params.get("max_context") or 0) or None)
        self.entry.engine_decoupled = params.get("engine_decoupled", "true") == "true"
        self.pool = ThreadPoolExecutor(max_workers=int(params["max_concurrency"]), thread_name_prefix="bayling")
        self.relay = Relay(name="bayling-relay")
        # A metric lives only as long as its family: keep the family referenced.
        self.requests_family = pb_utils.MetricFamily(name="bayling_requests_total", kind=pb_utils.MetricFamily.COUNTER,
                                                     description="Requests answered by the bayling model, by finish reason")
        self.finished = {r: self.requests_family.Metric(labels={"finish_reason": r}) for r in ("stop", "length", "cancelled")}
        self.in_flight_family = pb_utils.MetricFamily(name="bayling_requests_in_flight", kind=pb_utils.MetricFamily.GAUGE,
                                                      description="Requests the bayling model is answering now")
        self.in_flight = self.in_flight_family.Metric(labels={})
        # The Python backend's metric calls are not thread-safe (concurrent ones crash tritonserver).
        self.metrics_lock = threading.Lock()

    def execute(self, requests):
        for request in requests:
            self.pool.submit(self._serve, request)
        return None

    def finalize(self):
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.relay.stop()

    def _serve(self, request):
        self._count(self.in_flight, 1)
        try:
            self._answer(request)
        finally:
            self._count(self.in_flight, -1)

    def _count(self, metric, value):
        with self.metrics_lock:
            metric.increment(value)

    def _answer(self, request):
        sender = request.get_response_sender()

        def send(outputs, final, request=request):  # by the relay thread; holds the request until it is answered
            if isinstance(outputs, Exception):
                sender.send(io.error_response(outputs), flags=FINAL)
            else:
                io.send(sender, outputs, final)

        answer = None
        try:
            req = self.entry.parse(io.read_inputs(request, ENTRY_INPUTS))
            request_id = uuid.uuid4().hex
            stop_engine = _once(lambda: self._stop(request_id))
            answer = Answer(self.entry, req, self.relay, send, sender.is_cancelled, on_cancel=stop_engine)
            reason = self.entry.generate(req, self._engine(req, request_id, sender), stop_engine, answer)
            self._count(self.finished[reason], 1)
        except Exception as exc:
            if not isinstance(exc, BaylingError):
                log.exception("bayling request failed")
            if answer is not None:
                answer.fail(exc)
                return
            try:
                send(exc, True)
            except Exception:
                log.debug("error response not delivered", exc_info=True)

    def _engine(self, req, request_id, sender):
        inputs = [pb_utils.Tensor(k, v) for k, v in self.entry.engine_inputs(req).items()]
        call = pb_utils.InferenceRequest(model_name=ENGINE_MODEL, inputs=inputs, request_id=request_id,
                                         requested_output_names=self.entry.engine_output_names(req))
        responses = call.exec(decoupled=True) if self.entry.engine_decoupled else iter([call.exec()])
        try:
            for response in responses:
                if response.has_error():
                    error = response.error()
                    invalid = getattr(error, "code", lambda: None)() == pb_utils.TritonError.INVALID_ARG
                    raise (InvalidInput("engine", error.message()) if invalid else BaylingError(error.message()))
                if response.output_tensors():
                    yield {t.name(): t.as_numpy() for t in response.output_tensors()}
        finally:
            self._release(responses, sender)

    def _release(self, responses, sender):
        """Let go of a finished BLS response iterator only once the stub has let go of it.

        The iterator keeps every response it produced. Its last reference must be Python's: the
        stub also drops its own from its stub-to-parent thread without the GIL, and if that one is
        the last, the responses' numpy arrays are freed without the GIL, corrupting the heap while
        other threads run (python_backend of Triton 2.51; fixed upstream by #390). That thread
        works through one queue in order, and `is_cancelled` waits for its turn in the same queue,
        so once it returns the stub's reference is gone. A request already known to be cancelled
        answers without queueing: then the relay holds the iterator for a few seconds."""
        if sender.is_cancelled():
            self.relay.keep(responses, seconds=5.0)

    def _stop(self, request_id):
        """TensorRT-LLM's `stop` input: end the engine request with this id."""
        inputs = [pb_utils.Tensor("input_ids", np.zeros((1, 1), np.int32)),
                  pb_utils.Tensor("input_lengths", np.ones((1, 1), np.int32)),
                  pb_utils.Tensor("request_output_len", np.ones((1, 1), np.int32)),
                  pb_utils.Tensor("stop", np.ones((1, 1), np.bool_))]
        call = pb_utils.InferenceRequest(model_name=ENGINE_MODEL, inputs=inputs, request_id=request_id,
                                         requested_output_names=["output_ids"])
        if not self.entry.engine_decoupled:
            return    # one response per request: nothing runs on to be stopped
        for _ in call.exec(decoupled=True):
            pass


def _once(fn):
    """`fn` runs on the first call only (the request thread and the relay may both stop the engine)."""
    lock, done = threading.Lock(), []

    def call():
        with lock:
            if done:
                return
            done.append(True)
        fn()
    return call
