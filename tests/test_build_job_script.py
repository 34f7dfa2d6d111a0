"""The chart's engine-build script (helm/bayling/files/build-engine.sh) and the serving pods' wait
script (files/wait-for-engine.sh), run with bash/sh against temporary folders.

`bayling`, `hf` and `huggingface-cli` are stand-ins on PATH that record their arguments and
write what the real commands would leave behind (a downloaded folder, a merged checkpoint, an
engine folder with manifest.json). This is a unit test of the script's own logic: skipping a
finished spec, the lock (waiting, stale locks of dead pods, concurrent builders), the ready
marker written last, signals. The real commands are tested by their own tests.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "helm" / "bayling" / "files" / "build-engine.sh"
WAIT = ROOT / "helm" / "bayling" / "files" / "wait-for-engine.sh"
HASH = "0123456789ab"

STUB_BAYLING = r"""#!/usr/bin/env bash
echo "bayling $*" >> "$CALLS"
cmd="$1"; shift
out=""
while [ $# -gt 0 ]; do
  case "$1" in --output) out="$2"; shift 2 ;; *) shift ;; esac
done
case "$cmd" in
  build)
    if [ -n "${FAKE_HEARTBEAT_PROBE:-}" ]; then
      stat -c %Y "$FAKE_HEARTBEAT_PROBE" >> "$CALLS.heartbeat"; sleep "${FAKE_BUILD_SECONDS:-0}"
      stat -c %Y "$FAKE_HEARTBEAT_PROBE" >> "$CALLS.heartbeat"
    else
      trap 'kill "$nap" 2>/dev/null; exit 143' TERM   # like the real build: stop when told to
      sleep "${FAKE_BUILD_SECONDS:-0}" & nap=$!
      wait "$nap"
    fi
    [ -n "${FAKE_BUILD_FAIL:-}" ] && { echo "fake build failed" >&2; exit 3; }
    mkdir -p "$out/trtllm" && echo '{"engine": "tensorrt_llm"}' > "$out/manifest.json" ;;
  merge)
    mkdir -p "$out" && echo merged > "$out/model.safetensors" ;;
esac
"""

STUB_HF = r"""#!/usr/bin/env bash
echo "$(basename "$0") $*" >> "$CALLS"
[ "$1" = download ] || exit 2
dest=""
while [ $# -gt 0 ]; do
  case "$1" in --local-dir) dest="$2"; shift 2 ;; *) shift ;; esac
done
mkdir -p "$dest" && echo '{}' > "$dest/config.json"
"""


@pytest.fixture
def world(tmp_path):
    """A data volume, stub commands and the environment the chart gives the Job."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("bayling", STUB_BAYLING), ("hf", STUB_HF), ("huggingface-cli", STUB_HF)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    data = tmp_path / "data"
    engine = data / "engines" / f"bayling-13b-v1.1-trtllm-int8-wo-{HASH}"
    calls = tmp_path / "calls.log"
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "CALLS": str(calls),
        "DATA_DIR": str(data),
        "ENGINE_DIR": str(engine),
        "READY_FILE": f"{engine}.ready",
        "SPEC_HASH": HASH,
        "SPEC_JSON": json.dumps({"release": "BayLing-13B-v1.1", "quant": "int8-wo"}),
        "MODEL_NAME": "BayLing-13B-v1.1",
        "WEIGHTS_SOURCE": "huggingface",
        "MODEL_REPO": "ICTNLP/bayling-13b-v1.1",
        "MODEL_REVISION": "main",
        "DELTA": "false",
        "POLL_SECONDS": "0.1",
        "POD_NAME": "rel-bayling-build-0123-abcde",
    }

    class World:
        pass

    w = World()
    w.tmp, w.bin, w.data, w.engine, w.calls, w.env = tmp_path, bin_dir, data, engine, calls, env
    w.ready = Path(f"{engine}.ready")
    w.lock = data / ".bayling-build.lock"
    w.run = lambda *args, **kw: run_script(w, *args, **kw)
    w.start = lambda *args, **kw: start_script(w, *args, **kw)
    w.log = lambda: calls.read_text().splitlines() if calls.exists() else []
    return w


def run_script(w, *args, timeout=30, **extra_env):
    return subprocess.run(["bash", str(SCRIPT), *args], env={**w.env, **extra_env}, capture_output=True, text=True,
                          timeout=timeout)


def start_script(w, *args, **extra_env):
    return subprocess.Popen(["bash", str(SCRIPT), *args], env={**w.env, **extra_env}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def fake_lock(w, host, pid, age_seconds):
    w.lock.mkdir(parents=True)
    (w.lock / "owner").write_text(f"token=other\nhost={host}\npid={pid}\npod=other-pod\nstarted=then\nspec_hash={HASH}\n")
    heartbeat = w.lock / "heartbeat"
    heartbeat.touch()
    then = time.time() - age_seconds
    os.utime(heartbeat, (then, then))
    os.utime(w.lock, (then, then))


# --- the normal paths -------------------------------------------------------------------------------------
def test_first_run_downloads_builds_and_writes_the_ready_marker_last(world):
    result = world.run("--target", "trtllm", "--quant", "int8-wo")
    assert result.returncode == 0, result.stdout + result.stderr
    download = world.data / "downloads" / "ICTNLP_bayling-13b-v1.1@main"
    assert world.log() == [
        f"hf download ICTNLP/bayling-13b-v1.1 --revision main --local-dir {download}",
        f"bayling build --model {download} --output {world.engine} --name BayLing-13B-v1.1 --target trtllm --quant int8-wo",
    ]
    marker = json.loads(world.ready.read_text())
    assert marker["spec_hash"] == HASH and marker["engine_dir"] == str(world.engine)
    assert marker["spec"] == {"release": "BayLing-13B-v1.1", "quant": "int8-wo"}
    assert marker["built_by"] == "rel-bayling-build-0123-abcde"
    assert world.ready.stat().st_mtime >= (world.engine / "manifest.json").stat().st_mtime
    assert not world.lock.exists(), "the lock must be released"
    assert not list(world.engine.parent.glob("*.tmp.*")), "no temporary marker left behind"


def test_a_second_run_with_the_same_spec_does_nothing(world):
    assert world.run().returncode == 0
    calls = world.log()
    result = world.run()
    assert result.returncode == 0
    assert world.log() == calls, "nothing may run again"
    assert "nothing to do" in result.stdout and not world.lock.exists()


def test_a_delta_release_downloads_base_and_delta_then_merges_before_building(world):
    result = world.run(DELTA="true", MODEL_REPO="ICTNLP/bayling-13b-diff", BASE_REPO="huggyllama/llama-13b",
                       BASE_REVISION="main")
    assert result.returncode == 0, result.stdout + result.stderr
    delta = world.data / "downloads" / "ICTNLP_bayling-13b-diff@main"
    base = world.data / "downloads" / "huggyllama_llama-13b@main"
    merged = world.data / "merged" / world.engine.name
    assert world.log() == [
        f"hf download ICTNLP/bayling-13b-diff --revision main --local-dir {delta}",
        f"hf download huggyllama/llama-13b --revision main --local-dir {base}",
        f"bayling merge --base {base} --delta {delta} --output {merged}",
        f"bayling build --model {merged} --output {world.engine} --name BayLing-13B-v1.1",
    ]


def test_an_interrupted_delta_build_resumes_without_downloading_or_merging_again(world):
    env = dict(DELTA="true", MODEL_REPO="ICTNLP/bayling-13b-diff", BASE_REPO="huggyllama/llama-13b")
    assert world.run(FAKE_BUILD_FAIL="1", **env).returncode != 0
    assert not world.ready.exists() and not world.lock.exists()
    before = len(world.log())
    result = world.run(**env)
    assert result.returncode == 0, result.stdout
    assert [c.split()[1] for c in world.log()[before:]] == ["build"], "only the failed step runs again"
    assert "already downloaded" in result.stdout and "already merged" in result.stdout


def test_weights_from_a_volume_are_used_in_place(world):
    model, base = world.tmp / "weights" / "delta", world.tmp / "weights" / "llama"
    model.mkdir(parents=True)
    base.mkdir(parents=True)
    result = world.run(WEIGHTS_SOURCE="volume", MODEL_DIR=str(model), BASE_DIR=str(base), DELTA="true")
    assert result.returncode == 0, result.stdout
    merged = world.data / "merged" / world.engine.name
    assert world.log() == [f"bayling merge --base {base} --delta {model} --output {merged}",
                           f"bayling build --model {merged} --output {world.engine} --name BayLing-13B-v1.1"]
    assert not (world.data / "downloads").exists()


def test_a_missing_weights_folder_is_a_clear_error(world):
    result = world.run(WEIGHTS_SOURCE="volume", MODEL_DIR=str(world.tmp / "nope"))
    assert result.returncode == 1
    assert f"weights folder {world.tmp / 'nope'} does not exist" in result.stdout
    assert not world.lock.exists() and not world.ready.exists()


def test_the_older_huggingface_cli_is_used_when_hf_is_absent(world):
    (world.bin / "hf").unlink()
    assert world.run().returncode == 0
    assert world.log()[0].startswith("huggingface-cli download ICTNLP/bayling-13b-v1.1 --revision main --local-dir ")


def test_without_any_hugging_face_cli_the_error_says_what_to_install(world):
    (world.bin / "hf").unlink()
    (world.bin / "huggingface-cli").unlink()
    result = world.run()
    assert result.returncode == 1 and "pip install huggingface_hub" in result.stdout


def test_a_finished_engine_without_marker_gets_its_marker_without_a_rebuild(world):
    (world.engine / "trtllm").mkdir(parents=True)
    (world.engine / "manifest.json").write_text("{}")
    result = world.run()
    assert result.returncode == 0
    assert not any(c.startswith("bayling build") for c in world.log())
    assert json.loads(world.ready.read_text())["spec_hash"] == HASH


def test_an_unfinished_engine_folder_is_rebuilt_with_force(world):
    world.engine.mkdir(parents=True)
    (world.engine / "leftover").write_text("x")
    assert world.run().returncode == 0
    assert world.log()[-1].endswith("--name BayLing-13B-v1.1 --force")


def test_a_failed_build_leaves_no_marker_and_releases_the_lock(world):
    result = world.run(FAKE_BUILD_FAIL="1")
    assert result.returncode == 3
    assert not world.ready.exists() and not world.lock.exists()


def test_downloads_are_removed_after_the_build_when_asked(world):
    assert world.run(KEEP_DOWNLOADS="false").returncode == 0
    assert not (world.data / "downloads" / "ICTNLP_bayling-13b-v1.1@main").exists()
    assert world.ready.exists() and (world.engine / "manifest.json").exists()


def test_a_marker_of_another_spec_does_not_count(world):
    world.engine.parent.mkdir(parents=True)
    world.ready.write_text('{"spec_hash": "ffffffffffff"}\n')
    assert world.run().returncode == 0
    assert any(c.startswith("bayling build") for c in world.log())
    assert json.loads(world.ready.read_text())["spec_hash"] == HASH


# --- the lock ---------------------------------------------------------------------------------------------
def test_two_builders_at_once_build_only_once(world):
    first = world.start(FAKE_BUILD_SECONDS="1.5")
    deadline = time.time() + 10
    while not (world.lock / "owner").exists():
        assert time.time() < deadline and first.poll() is None, "the first builder never took the lock"
        time.sleep(0.05)
    second = world.start()
    out1, _ = first.communicate(timeout=30)
    out2, _ = second.communicate(timeout=30)
    assert first.returncode == 0 and second.returncode == 0, out1 + out2
    assert sum(c.startswith("bayling build") for c in world.log()) == 1
    assert "waiting for another build to finish" in out2 and "rel-bayling-build-0123-abcde" in out2
    assert "another builder finished spec" in out2
    assert not world.lock.exists()


def test_the_holder_keeps_its_heartbeat_fresh_during_a_long_build(world):
    result = world.run(FAKE_BUILD_SECONDS="2.5", HEARTBEAT_SECONDS="1",
                       FAKE_HEARTBEAT_PROBE=str(world.lock / "heartbeat"))
    assert result.returncode == 0, result.stdout
    before, after = map(int, Path(f"{world.calls}.heartbeat").read_text().split())
    assert after >= before + 1


def test_a_live_lock_is_waited_for_and_the_wait_gives_up_with_the_owner_named(world):
    fake_lock(world, host="other-node-pod", pid=1, age_seconds=0)
    result = world.run(LOCK_WAIT_SECONDS="1", LOCK_STALE_SECONDS="300")
    assert result.returncode == 1
    assert "gave up" in result.stdout and "pod=other-pod" in result.stdout
    assert (world.lock / "owner").read_text().startswith("token=other"), "someone else's lock is left alone"
    assert not world.log()


def test_a_stale_lock_of_a_dead_pod_is_taken_over(world):
    fake_lock(world, host="dead-pod", pid=12345, age_seconds=3600)
    result = world.run(LOCK_STALE_SECONDS="60")
    assert result.returncode == 0, result.stdout
    assert "lock is stale: no heartbeat for" in result.stdout and "removed the stale lock" in result.stdout
    assert world.ready.exists() and not world.lock.exists()


def test_a_lock_left_by_a_dead_process_of_this_pod_is_taken_over_at_once(world):
    dead = subprocess.Popen(["true"])
    dead.wait()
    fake_lock(world, host=socket.gethostname(), pid=dead.pid, age_seconds=0)
    start = time.time()
    result = world.run(LOCK_STALE_SECONDS="300")
    assert result.returncode == 0, result.stdout
    assert "is no longer running" in result.stdout
    assert time.time() - start < 10


def test_sigterm_stops_the_build_and_releases_the_lock(world):
    proc = world.start(FAKE_BUILD_SECONDS="30")
    deadline = time.time() + 10
    while not any(c.startswith("bayling build") for c in world.log()):
        assert time.time() < deadline, "the build never started"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 143, out
    assert "termination signal" in out
    assert not world.lock.exists() and not world.ready.exists()


# --- the serving pods' wait ----------------------------------------------------------------------------------
def wait_for(marker: Path, **env):
    return subprocess.run(["sh", str(WAIT)], env={"PATH": "/usr/bin:/bin", "MARKER": str(marker), "POLL_SECONDS": "0.1",
                                                  **env}, capture_output=True, text=True, timeout=30)


def test_wait_returns_at_once_when_the_engine_is_ready(tmp_path):
    marker = tmp_path / "e.ready"
    marker.write_text(f'{{\n  "spec_hash": "{HASH}"\n}}\n')
    result = wait_for(marker, EXPECT_HASH=HASH)
    assert result.returncode == 0 and "engine ready" in result.stdout


def test_wait_times_out_with_a_line_that_says_where_to_look(tmp_path):
    result = wait_for(tmp_path / "e.ready", TIMEOUT_SECONDS="1", BUILD_JOB="rel-bayling-build-01234567")
    assert result.returncode == 1
    assert "waiting for the engine" in result.stdout
    assert "ERROR: the engine is not ready after" in result.stdout
    assert "kubectl logs -f job/rel-bayling-build-01234567" in result.stdout


def test_wait_refuses_a_marker_of_another_spec(tmp_path):
    marker = tmp_path / "e.ready"
    marker.write_text('{"spec_hash": "ffffffffffff"}')
    result = wait_for(marker, EXPECT_HASH=HASH)
    assert result.returncode == 1 and "another build spec" in result.stdout


def test_wait_ends_when_the_build_job_finishes(tmp_path):
    marker = tmp_path / "e.ready"
    proc = subprocess.Popen(["sh", str(WAIT)], env={"PATH": "/usr/bin:/bin", "MARKER": str(marker), "POLL_SECONDS": "0.1"},
                            stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    assert proc.poll() is None, "must keep waiting while there is no marker"
    marker.write_text("{}")
    out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0 and "engine ready" in out
