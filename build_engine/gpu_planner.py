"""GPU memory planner for the TensorRT-LLM build: what fits on one GPU, and the limits to build with.

From the model's shape (its Hugging Face config.json), the quantization, the KV-cache type,
the tensor-parallel degree, the GPU's memory and the wanted context length, it computes
(per GPU):

  weights      parameter bytes as TensorRT-LLM 1.2 stores them (see `weight_bytes`)
  reserve      runtime overhead + activation memory of the engine (see `Assumptions`)
  KV cache     bytes per token = 2 (K and V) x layers x KV heads / tp x head_dim x dtype bytes
  free         GPU memory - weights - reserve: what the runtime measures as free after loading,
               and what `kv_cache_free_gpu_mem_fraction` is a fraction of
               (TensorRT-LLM 1.2.1 triton_backend: the executor's KvCacheConfig takes the smaller
               of that fraction and `max_tokens_in_paged_kv_cache`, as in 0.17; the LLM API's
               KvCacheConfig(free_gpu_memory_fraction, max_tokens) does the same)

and chooses `max_seq_len`, `max_input_len`, `max_num_tokens`, `max_batch_size`,
`kv_cache_free_gpu_mem_fraction` and `max_tokens_in_paged_kv_cache`. It refuses, with the
numbers, when the weights do not fit or the KV cache cannot hold one full-length sequence.

Every constant below is an assumption stated in `Assumptions`; the real figures are printed by
the engine at load time ("[MemUsageChange] Allocated ... for execution context memory",
"Allocated ... for max tokens in paged KV cache") and are what the GPU workflow compares.
"""

from __future__ import annotations


import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from bayling.errors import BaylingError
from bayling.manifest import read_json
from bayling.sizes import parse_size

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
QUANTS = ("int8-wo", "int8-sq", "fp16")      # the TensorRT engine target (trtllm)
LLMAPI_QUANTS = ("int8-wo", "fp8")            # the LLM API target (Model Optimizer checkpoints)
ALL_QUANTS = QUANTS + ("fp8",)
KV_CACHE_TYPES = ("fp16", "int8")
FP16 = 2


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a LLaMA-architecture config.json that decide memory."""
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    name: str = ""

    @classmethod
    def from_hf_config(cls, config: dict, name: str = "") -> "ModelShape":
        try:
            heads = int(config["num_attention_heads"])
            return cls(hidden_size=int(config["hidden_size"]), intermediate_size=int(config["intermediate_size"]),
                       num_layers=int(config["num_hidden_layers"]), num_heads=heads,
                       num_kv_heads=int(config.get("num_key_value_heads") or heads),
                       vocab_size=int(config["vocab_size"]),
                       max_position_embeddings=int(config.get("max_position_embeddings") or 2048),
                       tie_word_embeddings=bool(config.get("tie_word_embeddings", False)), name=name)
        except KeyError as exc:
            raise BaylingError(f"config.json of {name or 'the model'} lacks {exc.args[0]!r}; is it a LLaMA model?") from None

    @classmethod
    def from_config_file(cls, path: Path, name: str | None = None) -> "ModelShape":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise BaylingError(f"{path} not found: --model must be a Hugging Face checkpoint folder")
        return cls.from_hf_config(read_json(path), name if name is not None else path.parent.name)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def linear_params_per_layer(self) -> int:
        """q, k, v, o projections and the gated MLP (gate, up, down); LLaMA has no biases."""
        h = self.hidden_size
        return 2 * h * h + 2 * h * self.kv_dim + 3 * h * self.intermediate_size

    @property
    def out_channels_per_layer(self) -> int:
        """Output channels of the quantized GEMMs (fused qkv, dense, fc, gate, proj): one scale each."""
        h = self.hidden_size
        return (h + 2 * self.kv_dim) + h + 2 * self.intermediate_size + h

    @property
    def norm_params(self) -> int:
        return 2 * self.hidden_size * self.num_layers + self.hidden_size

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def total_params(self) -> int:
        lm_head = 0 if self.tie_word_embeddings else self.embedding_params
        return self.num_layers * self.linear_params_per_layer + self.embedding_params + lm_head + self.norm_params


# Reference shapes (the LLaMA-1 configs BayLing-7B/13B v1.x were fine-tuned from).
LLAMA_7B = ModelShape(4096, 11008, 32, 32, 32, 32000, 2048, False, "LLaMA-7B")
LLAMA_13B = ModelShape(5120, 13824, 40, 40, 40, 32000, 2048, False, "LLaMA-13B")


@dataclass(frozen=True)
class Assumptions:
    """What the planner cannot measure without a GPU, stated once."""
    # CUDA context (~0.3-0.5 GiB), cuBLAS/cuBLASLt workspaces, the TensorRT-LLM runtime and
    # decoder buffers, Triton's CUDA memory pool (64 MiB by default).
    runtime_overhead: int = 1 * GiB
    # NCCL and custom all-reduce workspaces per GPU when tp > 1.
    tp_overhead: int = 512 * MiB
    # TensorRT reuses activation memory layer to layer; the peak is about one layer's widest
    # tensors for every batched token: residual + normed input (2h), fused qkv (3h/tp) and the
    # gated MLP's two outputs (2 inter/tp), in fp16 - doubled for what TensorRT does not reuse.
    activation_safety: int = 2
    # Activations may take at most this share of the GPU: max_num_tokens is halved from
    # `max_num_tokens_cap` until they do (but not below max_input_len).
    activation_share: float = 0.10
    max_num_tokens_cap: int = 8192
    # The fp32 logits of the generation step, for up to `max_batch_cap` sequences.
    logits_bytes: int = 4
    # Memory left unused after the KV cache: at least this much, or this share of the GPU.
    headroom_min: int = 512 * MiB
    headroom_share: float = 0.05
    # Scheduler slots: twice the number of full-length sequences the KV cache holds (requests are
    # shorter on average; the guaranteed_no_evict scheduler never admits more than fits), capped.
    batch_per_full_sequence: int = 2
    max_batch_cap: int = 256
    # Tokens kept for the answer when choosing max_input_len (BayLing's max_new_tokens default),
    # but never more than half the context.
    output_reserve: int = 512
    tokens_per_block: int = 64          # passed to trtllm-build explicitly (its default changed across releases)


DEFAULT_ASSUMPTIONS = Assumptions()


def weight_bytes(model: ModelShape, quant: str, tp: int = 1) -> int:
    """Weight bytes on each GPU, as TensorRT-LLM 1.2 lays them out for LLaMA.

    * fp16: every parameter in 2 bytes.
    * int8-wo (W8A16): the q/k/v/o and MLP GEMM weights in 1 byte plus one fp16 scale per output
      channel; the embedding, lm_head and norms stay fp16 (weight_only_quantize_dict quantizes
      qkv, dense, fc, proj and gate only).
    * int8-sq (W8A8 per-channel + per-token): the same GEMMs in 1 byte plus one fp32 scale per
      output channel; per-tensor scalars and SmoothQuant's smoother vectors (under 1 MB) are left
      to the runtime reserve.
    * tp > 1: GEMM weights, their scales and the lm_head are split across GPUs; the embedding
      table (no --use_parallel_embedding) and the norms are replicated.
    """
    _check(quant, ALL_QUANTS, "quantization")
    if tp < 1:
        raise BaylingError("--tp must be at least 1")
    linear = model.num_layers * model.linear_params_per_layer
    scales = model.num_layers * model.out_channels_per_layer
    lm_head = model.embedding_params  # TensorRT-LLM keeps its own lm_head even when tied
    if quant == "fp16":
        return FP16 * (linear // tp + model.embedding_params + lm_head // tp + model.norm_params)
    if quant == "fp8":  # FP8 GEMM weights with per-tensor fp32 scales (a few bytes a layer)
        return linear // tp + FP16 * (model.embedding_params + lm_head // tp + model.norm_params)
    scale_bytes = FP16 if quant == "int8-wo" else 4
    return linear // tp + scale_bytes * scales // tp + FP16 * (model.embedding_params + lm_head // tp + model.norm_params)


def kv_heads_per_gpu(model: ModelShape, tp: int) -> int:
    # TensorRT-LLM duplicates KV heads when there are fewer than GPUs.
    return max(1, math.ceil(model.num_kv_heads / tp))


def kv_bytes_per_token(model: ModelShape, kv_cache: str = "fp16", tp: int = 1) -> int:
    _check(kv_cache, KV_CACHE_TYPES, "KV-cache type")
    dtype = 1 if kv_cache == "int8" else FP16
    return 2 * model.num_layers * kv_heads_per_gpu(model, tp) * model.head_dim * dtype


def activation_bytes_per_token(model: ModelShape, tp: int = 1, a: Assumptions = DEFAULT_ASSUMPTIONS) -> int:
    h = model.hidden_size
    widest = 2 * h + 3 * h // tp + 2 * model.intermediate_size // tp
    return a.activation_safety * FP16 * widest


def activation_bytes(model: ModelShape, tp: int, max_num_tokens: int, a: Assumptions = DEFAULT_ASSUMPTIONS) -> int:
    logits = a.max_batch_cap * math.ceil(model.vocab_size / tp) * a.logits_bytes
    return max_num_tokens * activation_bytes_per_token(model, tp, a) + logits


def runtime_bytes(tp: int, a: Assumptions = DEFAULT_ASSUMPTIONS) -> int:
    return a.runtime_overhead + (a.tp_overhead if tp > 1 else 0)


@dataclass
class GpuPlan:
    model: ModelShape
    quant: str
    kv_cache: str
    tp: int
    gpu_memory: int                  # bytes per GPU
    max_seq_len: int
    max_input_len: int
    max_num_tokens: int
    max_batch_size: int
    max_beam_width: int
    weight_bytes: int                # per GPU
    activation_bytes: int
    runtime_bytes: int
    free_after_load: int             # what kv_cache_free_gpu_mem_fraction is a fraction of
    kv_bytes_per_token: int
    kv_cache_free_gpu_mem_fraction: float
    kv_cache_bytes: int
    max_tokens_in_paged_kv_cache: int
    full_sequences: int              # max_seq_len sequences the KV cache holds at once
    paged_context_fmha: bool         # needed for KV-cache reuse and chunked context; not with INT8 KV
    calibration: bool                # int8-sq or INT8 KV cache: the converter calibrates
    calibration_fp16_bytes: int      # calibration loads the whole fp16 model, all ranks, in one process
    calibrate_on_cpu: bool
    notes: list[str] = field(default_factory=list)
    assumptions: Assumptions = DEFAULT_ASSUMPTIONS

    @property
    def reserve_bytes(self) -> int:
        return self.activation_bytes + self.runtime_bytes

    @property
    def kv_cache_reuse(self) -> bool:
        return self.paged_context_fmha

    def triton_parameters(self) -> dict[str, str]:
        """The values the GPU `tensorrt_llm` config template takes from the plan (all strings)."""
        return {
            "max_batch_size": str(self.max_batch_size),
            "max_beam_width": str(self.max_beam_width),
            "kv_cache_free_gpu_mem_fraction": f"{self.kv_cache_free_gpu_mem_fraction:.2f}",
            "max_tokens_in_paged_kv_cache": str(self.max_tokens_in_paged_kv_cache),
            "enable_kv_cache_reuse": "true" if self.kv_cache_reuse else "false",
            "enable_chunked_context": "true" if self.paged_context_fmha else "false",
            "batch_scheduler_policy": "guaranteed_no_evict",
        }

    def llm_api_settings(self) -> dict:
        """The LLM API arguments (TensorRT-LLM 1.2 TorchLlmArgs / KvCacheConfig) the plan chose: the
        same limits as the engine build, applied at load time instead of baked into an engine."""
        return {
            "max_batch_size": self.max_batch_size,
            "max_num_tokens": self.max_num_tokens,
            "max_seq_len": self.max_seq_len,
            "max_beam_width": self.max_beam_width,
            "enable_chunked_prefill": self.paged_context_fmha,
            "kv_cache_config": {
                "free_gpu_memory_fraction": round(self.kv_cache_free_gpu_mem_fraction, 2),
                "max_tokens": self.max_tokens_in_paged_kv_cache,
                "enable_block_reuse": self.kv_cache_reuse,
            },
        }

    def as_dict(self) -> dict:
        d = asdict(self)
        d["model"] = asdict(self.model)
        d["reserve_bytes"] = self.reserve_bytes
        d["kv_cache_reuse"] = self.kv_cache_reuse
        return d

    def format_table(self) -> str:
        m = self.model
        rows = [
            ("model", f"{m.name or 'model'}: hidden {m.hidden_size}, MLP {m.intermediate_size}, {m.num_layers} layers, "
                      f"{m.num_heads} heads ({m.num_kv_heads} KV), vocab {m.vocab_size}"),
            ("quantization", f"{self.quant}, KV cache {self.kv_cache}, tp {self.tp}"),
            ("GPU memory", _gib(self.gpu_memory) + " per GPU"),
            ("weights", _gib(self.weight_bytes) + " per GPU"),
            ("runtime reserve", _gib(self.runtime_bytes)),
            ("activations", f"{_gib(self.activation_bytes)} for {self.max_num_tokens} batched tokens"),
            ("free after load", _gib(self.free_after_load)),
            ("KV cache per token", f"{self.kv_bytes_per_token / KiB:.0f} KiB"),
            ("kv_cache_free_gpu_mem_fraction", f"{self.kv_cache_free_gpu_mem_fraction:.2f} -> {_gib(self.kv_cache_bytes)}"),
            ("tokens in KV cache", f"{self.max_tokens_in_paged_kv_cache} ({self.full_sequences} x {self.max_seq_len}-token sequences)"),
            ("max_seq_len / max_input_len", f"{self.max_seq_len} / {self.max_input_len}"),
            ("max_num_tokens", str(self.max_num_tokens)),
            ("max_batch_size", str(self.max_batch_size)),
            ("KV-cache reuse", "on (paged context FMHA)" if self.kv_cache_reuse else "off (needs paged context FMHA, which INT8 KV cache lacks)"),
        ]
        if self.calibration:
            where = "CPU (--load_model_on_cpu)" if self.calibrate_on_cpu else "GPU"
            rows.append(("calibration", f"loads the whole fp16 model ({_gib(self.calibration_fp16_bytes)}) on {where}"))
        width = max(len(k) for k, _ in rows)
        lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def plan(model: ModelShape, quant: str = "int8-wo", kv_cache: str = "fp16", tp: int = 1,
         gpu_memory: int = 16 * GiB, max_context: int | None = None,
         assumptions: Assumptions = DEFAULT_ASSUMPTIONS, *, suggest: bool = True) -> GpuPlan:
    """Choose the build and runtime limits, or refuse with the numbers (and, with `suggest`,
    the nearest settings that would fit)."""
    a = assumptions
    _check(quant, ALL_QUANTS, "quantization")
    _check(kv_cache, KV_CACHE_TYPES, "KV-cache type")
    if tp < 1:
        raise BaylingError("--tp must be at least 1")
    if gpu_memory <= 0:
        raise BaylingError("the GPU memory must be positive")
    if model.num_heads % tp or model.intermediate_size % tp:
        raise BaylingError(f"--tp {tp} does not divide {model.num_heads} heads and MLP size {model.intermediate_size}")
    notes: list[str] = []
    wanted = max_context or model.max_position_embeddings
    max_seq_len = min(wanted, model.max_position_embeddings)
    if wanted > model.max_position_embeddings:
        notes.append(f"--max-context {wanted} is more than the model's {model.max_position_embeddings} positions; "
                     f"using {max_seq_len}")
    if max_seq_len < 16:
        raise BaylingError(f"a context of {max_seq_len} tokens is too small to serve")
    max_input_len = max_seq_len - min(a.output_reserve, max_seq_len // 2)

    weights = weight_bytes(model, quant, tp)
    runtime = runtime_bytes(tp, a)
    if weights + runtime >= gpu_memory:
        raise BaylingError(_refusal(model, quant, kv_cache, tp, gpu_memory, max_context, suggest,
                                    f"the {quant} weights alone need {_gib(weights)} per GPU, plus {_gib(runtime)} "
                                    f"for the runtime, and the GPU has {_gib(gpu_memory)}", a))

    # max_num_tokens: the largest power-of-two step (from the cap) whose activations stay within
    # `activation_share` of the GPU; if the KV cache then cannot hold one full sequence, smaller
    # steps (down to max_input_len) are tried before refusing.
    first = a.max_num_tokens_cap
    while activation_bytes(model, tp, first, a) > a.activation_share * gpu_memory and first // 2 >= max_input_len:
        first //= 2
    candidates = [first]
    while candidates[-1] // 2 >= max_input_len:
        candidates.append(candidates[-1] // 2)
    candidates = list(dict.fromkeys(max(c, max_input_len) for c in candidates + [max_input_len]))

    headroom = max(a.headroom_min, int(a.headroom_share * gpu_memory))
    per_token = kv_bytes_per_token(model, kv_cache, tp)
    for max_num_tokens in candidates:
        activations = activation_bytes(model, tp, max_num_tokens, a)
        free = gpu_memory - weights - runtime - activations
        if free <= headroom:
            why = (f"weights ({_gib(weights)}), runtime ({_gib(runtime)}) and activations ({_gib(activations)} for "
                   f"{max_num_tokens} tokens) leave {_gib(free)} of {_gib(gpu_memory)}, not more than the "
                   f"{_gib(headroom)} kept free")
            continue
        fraction = min(0.95, math.floor((free - headroom) / free * 100) / 100)
        kv_cache_bytes = int(fraction * free)
        tokens = kv_cache_bytes // per_token // a.tokens_per_block * a.tokens_per_block
        if tokens >= max_seq_len:
            break
        why = (f"after weights ({_gib(weights)}), runtime and activations ({_gib(runtime + activations)} with "
               f"max_num_tokens {max_num_tokens}) the KV cache gets {_gib(kv_cache_bytes)} = {tokens} tokens at "
               f"{per_token / KiB:.0f} KiB each, less than one sequence of {max_seq_len}")
    else:
        raise BaylingError(_refusal(model, quant, kv_cache, tp, gpu_memory, max_context, suggest, why, a))
    if max_num_tokens != first:
        notes.append(f"max_num_tokens lowered from {first} to {max_num_tokens} to leave the KV cache one full sequence")
    full = tokens // max_seq_len
    batch = max(1, min(a.max_batch_cap, a.batch_per_full_sequence * full))

    paged_context_fmha = kv_cache != "int8"
    if not paged_context_fmha:
        notes.append("INT8 KV cache: paged context FMHA (and with it KV-cache reuse and chunked context) is off; "
                     "TensorRT-LLM's paged context FMHA does not take an INT8 KV cache (NVIDIA/TensorRT-LLM#2166)")
    calibration = quant in ("int8-sq", "fp8") or kv_cache == "int8"
    calib_bytes = FP16 * model.total_params
    calibrate_on_cpu = calibration and calib_bytes + runtime > gpu_memory * tp
    if calibrate_on_cpu:
        notes.append(f"calibration loads the whole fp16 model ({_gib(calib_bytes)}), more than the GPU memory: it runs "
                     f"on the CPU (needs that much RAM, and is slow)")
    return GpuPlan(model=model, quant=quant, kv_cache=kv_cache, tp=tp, gpu_memory=gpu_memory, max_seq_len=max_seq_len,
                   max_input_len=max_input_len, max_num_tokens=max_num_tokens, max_batch_size=batch, max_beam_width=1,
                   weight_bytes=weights, activation_bytes=activations, runtime_bytes=runtime, free_after_load=free,
                   kv_bytes_per_token=per_token, kv_cache_free_gpu_mem_fraction=fraction, kv_cache_bytes=kv_cache_bytes,
                   max_tokens_in_paged_kv_cache=tokens, full_sequences=full, paged_context_fmha=paged_context_fmha,
                   calibration=calibration, calibration_fp16_bytes=calib_bytes, calibrate_on_cpu=calibrate_on_cpu,
                   notes=notes, assumptions=a)


def _refusal(model: ModelShape, quant: str, kv_cache: str, tp: int, gpu_memory: int, max_context: int | None,
             suggest: bool, why: str, a: Assumptions) -> str:
    name = model.name or "the model"
    lines = [f"{name} ({quant}, KV cache {kv_cache}, tp {tp}) does not fit in {_gib(gpu_memory)}: {why}."]
    if not suggest:
        return lines[0]
    context = min(max_context or model.max_position_embeddings, model.max_position_embeddings)
    tries = []
    for q, kv, t, ctx in ((quant, "int8", tp, max_context), ("int8-wo", kv_cache, tp, max_context),
                          ("int8-wo", "int8", tp, max_context), (quant, kv_cache, tp * 2, max_context),
                          ("int8-wo", "int8", tp, context // 2)):
        if (q, kv, t, ctx) == (quant, kv_cache, tp, max_context):
            continue
        try:
            p = plan(model, q, kv, t, gpu_memory, ctx, a, suggest=False)
        except BaylingError:
            continue
        flags = f"--quant {q} --kv-cache {kv} --tp {t}" + (f" --max-context {ctx}" if ctx else "")
        tries.append(f"{flags} fits ({p.max_tokens_in_paged_kv_cache} KV tokens, batch {p.max_batch_size})")
    if tries:
        lines.append("What would fit: " + "; ".join(dict.fromkeys(tries)) + ".")
    else:
        lines.append("Use a GPU with more memory or more GPUs (--tp).")
    return " ".join(lines)


def parse_memory(text: str | int) -> int:
    """'16GiB', '16 GB' (decimal), '24G' (binary, like nvidia-smi's MiB), '80000MiB', or bytes."""
    return parse_size(text, bare_unit_base=1024, what="memory size", examples="16GiB, 24GB, 40960MiB")


def _check(value: str, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        raise BaylingError(f"unknown {what} {value!r}; choose from {', '.join(choices)}")


def _gib(n: int | float) -> str:
    return f"{n / GiB:.2f} GiB"


def with_assumptions(**changes) -> Assumptions:
    return replace(DEFAULT_ASSUMPTIONS, **changes)
