"""What the default engine generates, computed in-process by llama.cpp one token at a time (no scheduler,
no batching, no Triton): the reference the served answers are checked against."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def greedy_reference(engine_dir: Path, prompt: list[int], max_tokens: int, end_id: int | None = None
                     ) -> tuple[list[int], list[float]]:
    """Greedy tokens after `prompt` and the log prob of each (log-softmax of the model's logits)."""
    from bayling.build_engine.gguf_build import GGUF_NAME
    from bayling.manifest import ENGINE_SUBDIRS
    from bayling.model_repository.engine_llamacpp import LlamaModel

    tokens, log_probs = [], []
    with LlamaModel(str(Path(engine_dir) / ENGINE_SUBDIRS["llamacpp"] / GGUF_NAME), slots=1,
                    context=len(prompt) + max_tokens + 1, threads=2) as model:
        model.tokens[:len(prompt)], model.positions[:len(prompt)] = prompt, np.arange(len(prompt))
        model.seq_ids[:len(prompt)], model.wants_logits[:len(prompt)] = 0, 0
        model.wants_logits[len(prompt) - 1] = 1
        assert model.decode(len(prompt)) == 0
        for position in range(len(prompt), len(prompt) + max_tokens):
            row = model.logits(1)[0]
            token = int(np.argmax(row))
            if token == end_id:
                break
            top = float(row.max())
            tokens.append(token)
            log_probs.append(float(row[token]) - top - float(np.log(np.exp(row - top).sum())))
            model.tokens[0], model.positions[0], model.seq_ids[0], model.wants_logits[0] = token, position, 0, 1
            assert model.decode(1) == 0
    return tokens, log_probs
