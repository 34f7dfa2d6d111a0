"""Shared fixtures: models the tests build, engines, and real tritonserver instances.

End-to-end tests can also run against a server started elsewhere (the GPU workflow runs them
against TensorRT-LLM in NVIDIA's container): pass --grpc-url and --http-url; tests that need
the local CPU engine files are marked `cpu_engine` and deselected there with `-m "not cpu_engine"`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Engines built by the tests are kept between runs (the default one takes half a minute to build).
os.environ.setdefault("BAYLING_CACHE", str(ROOT / ".cache" / "test"))

from tests.models import save_scripted_llama, train_llama_tokenizer  # noqa: E402

SCRIPT_TEXT = "我是[名字]，来自龘。"           # what the scripted model says, placeholder included
SCRIPT_SHOWN = "我是百聆，来自龘。"             # what a user reads


def pytest_addoption(parser):
    parser.addoption("--grpc-url", help="run end-to-end tests against this server's gRPC endpoint (host:port)")
    parser.addoption("--http-url", help="... and this HTTP endpoint (host:port)")
    parser.addoption("--metrics-url", help="... and this metrics endpoint (http://host:port/metrics)")


def pytest_configure(config):
    config.addinivalue_line("markers", "cpu_engine: needs the CPU engine files (not for an external server)")


def bayling_cli(*args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run the real `bayling` command in a subprocess."""
    return subprocess.run([sys.executable, "-m", "bayling.cli", *args], capture_output=True, text=True,
                          check=check, **kwargs)


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    return Path(os.environ["BAYLING_CACHE"])


@pytest.fixture(scope="session")
def llama_tokenizer_dir(tmp_path_factory) -> Path:
    """A LLaMA-style SentencePiece tokenizer (BPE, byte fallback, <unk>/<s>/</s> = 0/1/2)."""
    return train_llama_tokenizer(tmp_path_factory.mktemp("sp-tokenizer"))


@pytest.fixture(scope="session")
def llama_tokenizer(llama_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(llama_tokenizer_dir))


@pytest.fixture(scope="session")
def prompt_and_script(llama_tokenizer) -> tuple[list[int], list[int]]:
    """The scripted model's chat prompt ("hi" in BayLing's template) and the tokens it answers with."""
    from bayling.templates import builtin_template
    from bayling.tokenization import PromptEncoder

    encoder = PromptEncoder(llama_tokenizer, builtin_template("bayling"))
    prompt = encoder.encode_messages([{"role": "user", "content": "hi"}]).ids
    return prompt, llama_tokenizer.encode(SCRIPT_TEXT, add_special_tokens=False)


def _default_engine(target: str) -> Path:
    from bayling.paths import default_engine_dir

    engine = default_engine_dir(target)
    if not (engine / "manifest.json").is_file():
        bayling_cli("build", "--default", "--target", target)
    return engine


@pytest.fixture(scope="session")
def default_engine(cache_dir) -> Path:
    """The embedded default model's CPU INT8 engine (`bayling build --default`: llama.cpp Q8_0), built once."""
    return _default_engine("cpu")


@pytest.fixture(scope="session")
def default_ct2_engine(cache_dir) -> Path:
    """The same model's CTranslate2 INT8 engine (`bayling build --default --target cpu-ct2`), built once."""
    return _default_engine("cpu-ct2")


@pytest.fixture(scope="session")
def smol_tokenizer(default_engine):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_engine / "tokenizer"))


@pytest.fixture(scope="session")
def scripted_model_dir(tmp_path_factory, llama_tokenizer_dir, llama_tokenizer) -> Path:
    """A tiny BayLing-templated LLaMA whose greedy answer to any chat is SCRIPT_TEXT, then EOS."""
    from bayling.templates import builtin_template
    from bayling.tokenization import PromptEncoder

    encoder = PromptEncoder(llama_tokenizer, builtin_template("bayling"))
    start = encoder.encode_messages([{"role": "user", "content": "你好"}]).ids[-1]
    script = llama_tokenizer.encode(SCRIPT_TEXT, add_special_tokens=False) + [llama_tokenizer.eos_token_id]
    return save_scripted_llama(tmp_path_factory.mktemp("models") / "tiny-bayling-scripted", llama_tokenizer_dir,
                               script, start)


@pytest.fixture(scope="session")
def scripted_engine(tmp_path_factory, scripted_model_dir) -> Path:
    """The scripted model's default CPU engine (llama.cpp Q8_0)."""
    out = tmp_path_factory.mktemp("engines") / "tiny-bayling-scripted"
    bayling_cli("build", "--model", str(scripted_model_dir), "--output", str(out))
    return out


@pytest.fixture(scope="session")
def scripted_ct2_engine(tmp_path_factory, scripted_model_dir) -> Path:
    """The scripted model's CTranslate2 INT8 engine."""
    out = tmp_path_factory.mktemp("engines") / "tiny-bayling-scripted-ct2"
    bayling_cli("build", "--model", str(scripted_model_dir), "--output", str(out), "--target", "cpu-ct2")
    return out


@dataclass
class Endpoints:
    grpc: str
    http: str
    engine: Path | None  # None for an external server
    log: Path | None = None
    metrics: str | None = None


def _start(engine: Path, log_dir: Path):
    from bayling.model_repository.serve import ServeOptions, start_server

    return start_server(ServeOptions(engine, 0, 0, 0, address="127.0.0.1", run_dir=log_dir,
                                     log_file=log_dir / "tritonserver.log", ready_timeout=300))


@pytest.fixture(scope="session")
def default_server(request, tmp_path_factory):
    """The server for the embedded default model, or the external server given on the command line."""
    grpc, http = request.config.getoption("--grpc-url"), request.config.getoption("--http-url")
    if grpc and http:
        yield Endpoints(grpc, http, None, metrics=request.config.getoption("--metrics-url"))
        return
    default_engine = request.getfixturevalue("default_engine")
    server = _start(default_engine, tmp_path_factory.mktemp("server-default"))
    yield Endpoints(server.grpc_url, server.http_url, default_engine, server.log_file, server.metrics_url)
    server.stop()


@pytest.fixture(scope="session")
def ct2_server(default_ct2_engine, tmp_path_factory):
    """The default model on the CTranslate2 engine: for what only that engine does (beam search)."""
    server = _start(default_ct2_engine, tmp_path_factory.mktemp("server-ct2"))
    yield Endpoints(server.grpc_url, server.http_url, default_ct2_engine, server.log_file, server.metrics_url)
    server.stop()


@pytest.fixture(scope="session")
def scripted_server(scripted_engine, tmp_path_factory):
    server = _start(scripted_engine, tmp_path_factory.mktemp("server-scripted"))
    yield Endpoints(server.grpc_url, server.http_url, scripted_engine, server.log_file, server.metrics_url)
    server.stop()
