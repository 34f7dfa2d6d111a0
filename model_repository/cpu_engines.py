"""Which CPU engine serves the `tensorrt_llm` model: the engine folder's manifest says.

    llamacpp     engine_llamacpp.LlamaCppEngine over llamacpp/model.gguf (continuous batching)
    ctranslate2  engine_ct2.Ct2Engine over ctranslate2/ (batches in lanes; beam search)

Both take `EngineRequest`s and answer `Emission`s, so the Triton adapter does not know which runs.
"""

from __future__ import annotations

from pathlib import Path

from bayling.manifest import ENGINE_SUBDIRS, EngineManifest


def open_cpu_engine(engine_dir: Path, manifest: EngineManifest, params: dict[str, str]):
    """The engine for the model's parameters (as `render` writes them into config.pbtxt)."""
    threads = int(params["intra_threads"])
    max_batch_size = int(params["max_batch_size"])
    one_token = params["one_token_per_response"] == "true"
    folder = Path(engine_dir) / ENGINE_SUBDIRS[manifest.engine]
    if manifest.engine == "llamacpp":
        from bayling.build_engine.gguf_build import GGUF_NAME
        from bayling.model_repository.engine_llamacpp import LlamaCppEngine

        return LlamaCppEngine(str(folder / GGUF_NAME), context=int(params["max_context"]), max_batch_size=max_batch_size,
                              threads=threads, one_token_per_response=one_token)
    from bayling.model_repository.engine_ct2 import Ct2Engine

    return Ct2Engine(str(folder), max_batch_size=max_batch_size, intra_threads=threads, lanes=int(params["lanes"]),
                     join_lanes=int(params["join_lanes"]), one_token_per_response=one_token)
