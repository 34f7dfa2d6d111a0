"""Start and stop a real `tritonserver` on a rendered model repository.

On CPU the binary comes from the `nvidia-pytriton` wheel (Triton 2.51 with the Python
backend); its backend folder is copied once to a writable cache with the Python stub of
the running interpreter, and the Python models import packages from this environment.
In NVIDIA's container (GPU) the container's own `tritonserver` and backends are used.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from bayling.errors import BaylingError
from bayling.model_repository.front import DEFAULT_MAX_REQUEST_BYTES, Front, FrontOptions

if TYPE_CHECKING:
    from bayling.model_repository.supervisor import Supervisor


@dataclass
class Launcher:
    binary: Path
    backend_dir: Path | None
    env: dict[str, str]


def _pytriton_root() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    return Path(spec.origin).parent if spec and spec.origin else None


def pytriton_launcher(cache: Path) -> Launcher:
    root = _pytriton_root()
    if root is None:
        raise BaylingError("no tritonserver: install the CPU extra (pip install 'bayling-deploy[cpu]') or run in NVIDIA's container")
    server = root / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = server / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise BaylingError(f"nvidia-pytriton has no Python backend stub for Python {version}")
    # The wheel's folder may be read-only and lacks the stub beside the backend: use a private copy.
    backends = cache / f"triton-backends-py{version}"
    if not (backends / "python" / "triton_python_backend_stub").is_file():
        tmp = cache / f".triton-backends-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(server / "backends", tmp)
        shutil.copy2(stub, tmp / "python" / "triton_python_backend_stub")
        cache.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(backends, ignore_errors=True)
        os.replace(tmp, backends)
    env = dict(os.environ)
    libs = [str(root.parent / "nvidia_pytriton.libs")]
    # The stub links libpython3.X.so.1.0: it must be this interpreter's, not another 3.X on the
    # system (whose C API may lack symbols that this interpreter's extension modules use).
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir and (Path(libdir) / sysconfig.get_config_var("INSTSONAME")).is_file():
        libs.insert(0, libdir)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (*libs, env.get("LD_LIBRARY_PATH", "")) if p)
    # The stub embeds the Python found first on PATH: make it this environment's.
    env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
    return Launcher(server / "bin" / "tritonserver", backends, env)


def container_launcher() -> Launcher:
    binary = shutil.which("tritonserver") or "/opt/tritonserver/bin/tritonserver"
    if not Path(binary).is_file():
        raise BaylingError("no tritonserver on PATH: TensorRT-LLM engines are served inside NVIDIA's Triton TensorRT-LLM container")
    return Launcher(Path(binary), None, dict(os.environ))


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child: if the process that started tritonserver dies, so does tritonserver (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def python_pool_size(max_concurrency: int) -> int:
    return 2 * max_concurrency + 16


@dataclass
class TritonServer:
    """tritonserver, with its HTTP endpoint behind the front (`bayling.model_repository.front`): Triton's
    own HTTP listens on a loopback port, the front on `address:http_port`."""
    repository: Path
    launcher: Launcher
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    address: str = "0.0.0.0"
    log_file: Path | None = None
    extra_args: list[str] = field(default_factory=list)
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    supervise: bool = True             # watch the model processes and the engine (model_repository.supervisor)
    max_concurrency: int = 64          # requests one `bayling` instance serves at once (sizes the Python backend's pool)
    process: subprocess.Popen | None = None
    triton_http_port: int = 0          # Triton's own HTTP port on loopback (chosen at start)
    front: Front | None = None
    supervisor: "Supervisor | None" = None

    def health(self) -> tuple[bool, bool, str]:
        """(ready, live, why not) beyond Triton's own view, for the front."""
        return self.supervisor.health() if self.supervisor else (True, True, "")

    @property
    def failure(self) -> str:
        """Why the supervisor stopped the server ("" if it did not)."""
        return self.supervisor.verdict.fatal if self.supervisor else ""

    @property
    def http_url(self) -> str:
        return f"{self._host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self._host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._host}:{self.metrics_port}/metrics"

    @property
    def _host(self) -> str:
        return "127.0.0.1" if self.address in ("0.0.0.0", "") else self.address

    def command(self) -> list[str]:
        cmd = [str(self.launcher.binary), f"--model-repository={self.repository}",
               f"--http-port={self.triton_http_port}", f"--grpc-port={self.grpc_port}", f"--metrics-port={self.metrics_port}",
               "--http-address=127.0.0.1", f"--grpc-address={self.address}", f"--metrics-address={self.address}",
               "--allow-metrics=true", "--strict-readiness=true", "--exit-timeout-secs=15"]
        # The Python backend runs each instance's BLS calls and response sends on a pool (32 threads by
        # default); a decoupled BLS stream holds a thread until it ends, so 40 streams and their stop
        # requests wedged every request. Room for all of them: a stream and a stop request per request.
        cmd.append(f"--backend-config=python,thread-pool-size={python_pool_size(self.max_concurrency)}")
        if self.launcher.backend_dir is not None:
            cmd += [f"--backend-directory={self.launcher.backend_dir}", "--allow-gpu-metrics=false"]
        return cmd + self.extra_args

    def start(self, timeout: float = 600) -> "TritonServer":
        self.triton_http_port = self.triton_http_port or free_port()
        out = open(self.log_file, "ab") if self.log_file else None
        self.process = subprocess.Popen(self.command(), env=self.launcher.env, stdout=out, stderr=subprocess.STDOUT if out else None,
                                        start_new_session=True, preexec_fn=_die_with_parent)
        if out:
            out.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BaylingError(f"tritonserver exited with code {self.process.returncode} while loading"
                                   + (f"; see {self.log_file}" if self.log_file else ""))
            if self.ready():
                try:
                    self.front = Front(FrontOptions(self.address, self.http_port, f"127.0.0.1:{self.triton_http_port}",
                                                    self.max_request_bytes), self.health).start()
                except BaylingError:
                    self.stop()
                    raise
                if self.supervise:
                    self.supervisor = self._supervisor().start()
                return self
            time.sleep(0.5)
        self.stop()
        raise BaylingError(f"tritonserver was not ready after {timeout:.0f}s" + (f"; see {self.log_file}" if self.log_file else ""))

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.triton_http_port}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self, timeout: float = 30) -> int | None:
        """Graceful: SIGINT lets Triton finish in-flight requests; then SIGKILL."""
        if self.supervisor is not None:
            self.supervisor.stop()
        if self.front is not None:
            self.front.stop()
            self.front = None
        p = self.process
        if p is None:
            return None
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(p.pid, signal.SIGKILL)    # tritonserver past its timeout, or a stub that outlived it
        except ProcessLookupError:
            pass
        return p.wait()

    def _supervisor(self) -> "Supervisor":
        from bayling.model_repository.supervisor import Supervisor, generation_probe, python_models

        def kill() -> None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)   # its stubs too: in-flight clients see the end now
            except ProcessLookupError:
                pass

        return Supervisor(self.process.pid, python_models(self.repository),
                          lambda: generation_probe(self.grpc_url, timeout=60), kill)

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
