"""The GitHub Actions workflows: linted with actionlint and yamllint, and checked against what
they must do (CPU: the README's test command; GPU: the pinned NGC container, the INT8 TensorRT-LLM
build, Triton, the end-to-end suite against that server, the benchmark, the artifacts)."""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / ".github" / "workflows"
CI = WORKFLOWS / "ci.yml"
GPU = WORKFLOWS / "gpu-engine.yml"
# Runner labels beyond GitHub's own: the GPU runner's.
ACTIONLINT_CONFIG = "self-hosted-runner:\n  labels: [gpu]\n"
YAMLLINT_CONFIG = ("{extends: default, rules: {line-length: {max: 140}, truthy: {check-keys: false}, "
                   "document-start: disable}}")


def tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    found = str(path) if path.is_file() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed: pip install -e '.[dev]' (make test does)", pytrace=False)
    return found


def load(path: Path) -> dict:
    # PyYAML reads the `on:` key as True
    data = yaml.safe_load(path.read_text())
    data["on"] = data.pop(True, data.get("on"))
    return data


def steps_text(job: dict) -> str:
    return "\n".join(str(s.get("run", "")) for s in job["steps"])


def test_both_workflows_exist():
    assert sorted(p.name for p in WORKFLOWS.glob("*.yml")) == ["ci.yml", "gpu-engine.yml"]


def test_actionlint_finds_nothing(tmp_path):
    config = tmp_path / "actionlint.yaml"
    config.write_text(ACTIONLINT_CONFIG)
    result = subprocess.run([tool("actionlint"), "-config-file", str(config), "-no-color", str(CI), str(GPU)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_yamllint_finds_nothing():
    result = subprocess.run([tool("yamllint"), "-f", "parsable", "-d", YAMLLINT_CONFIG, str(WORKFLOWS)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_ci_runs_the_readme_test_command_and_keeps_logs_of_failures():
    readme_command = re.search(r"^(make test)\b", (ROOT / "README.md").read_text(), re.M).group(1)
    wf = load(CI)
    assert {"push", "pull_request"} <= set(wf["on"])
    assert wf["permissions"] == {"contents": "read"}
    job = wf["jobs"]["test"]
    assert job["runs-on"].startswith("ubuntu-")
    setup = next(s for s in job["steps"] if str(s.get("uses", "")).startswith("actions/setup-python@"))
    assert setup["with"]["python-version"] == "3.11"
    run = next(s for s in job["steps"] if "make test" in str(s.get("run", "")))
    assert run["run"].split()[:2] == readme_command.split()
    assert run.get("shell") == "bash", "bash -o pipefail: a failing make test must fail the step through the tee"
    upload = next(s for s in job["steps"] if str(s.get("uses", "")).startswith("actions/upload-artifact@"))
    assert upload["if"] == "failure()" and "make-test.log" in upload["with"]["path"]


def test_gpu_workflow_runs_in_the_pinned_ngc_container_on_a_gpu_runner():
    from bayling.build_engine.trtllm_release import TRITON_IMAGE

    wf = load(GPU)
    job = wf["jobs"]["engine"]
    assert {"self-hosted", "linux", "x64", "gpu"} <= set(job["runs-on"])
    assert job["container"]["image"] == TRITON_IMAGE
    assert wf["env"]["TRITON_IMAGE"] == TRITON_IMAGE
    assert "--gpus all" in job["container"]["options"] and "--shm-size" in job["container"]["options"]
    assert wf["permissions"] == {"contents": "read"}
    assert wf["concurrency"]["cancel-in-progress"] is False


def test_the_gpu_dockerfile_and_the_chart_name_the_pinned_container_too():
    from bayling.build_engine.trtllm_release import TRITON_IMAGE, TRITON_RELEASE

    dockerfile = (ROOT / "docker" / "Dockerfile.gpu").read_text(encoding="utf-8")
    assert re.search(r"^ARG BASE_IMAGE=(\S+)$", dockerfile, re.M).group(1) == TRITON_IMAGE
    values = yaml.safe_load((ROOT / "helm" / "bayling" / "values.yaml").read_text(encoding="utf-8"))
    assert values["image"]["gpu"]["tag"] == TRITON_IMAGE.rsplit(":", 1)[1] == f"{TRITON_RELEASE}-trtllm-python-py3"


def test_gpu_workflow_inputs_are_the_charts_releases_and_the_builds_quantizations():
    from bayling.build_engine.gpu_planner import ALL_QUANTS

    values = yaml.safe_load((ROOT / "helm" / "bayling" / "values.yaml").read_text())
    inputs = load(GPU)["on"]["workflow_dispatch"]["inputs"]
    assert set(inputs["release"]["options"]) == set(values["model"]["releases"])
    assert inputs["release"]["default"] == values["model"]["release"]
    assert set(inputs["quant"]["options"]) <= set(ALL_QUANTS) and "fp16" not in inputs["quant"]["options"]
    assert inputs["quant"]["default"] == "int8-wo"
    # both GPU targets of `bayling build`, the TensorRT engine by default
    from bayling.build_engine import build

    parser = argparse.ArgumentParser()
    build.add_arguments(parser)
    targets = next(a for a in parser._actions if a.dest == "target").choices
    assert set(inputs["target"]["options"]) == set(targets) - {"cpu", "cpu-ct2"} and inputs["target"]["default"] == "trtllm"


def test_gpu_workflow_builds_serves_tests_benchmarks_and_uploads():
    job = load(GPU)["jobs"]["engine"]
    names = [s.get("name", s.get("uses", "")) for s in job["steps"]]
    text = steps_text(job)

    def index(fragment):
        return next(i for i, s in enumerate(job["steps"]) if fragment in str(s.get("run", "")) + str(s.get("uses", "")))

    # the chart's own build script, for real, with the TensorRT-LLM target
    build = index("helm/bayling/files/build-engine.sh")
    assert '--target "$TARGET"' in job["steps"][build]["run"] and '--quant "$QUANT"' in job["steps"][build]["run"]
    assert job["env"]["TARGET"] == "${{ inputs.target }}"
    serve = index("bayling serve --engine")
    tests = index("pytest")
    bench = index("bayling bench")
    stop = next(i for i, n in enumerate(names) if n == "Stop Triton")
    upload = index("actions/upload-artifact@")
    assert build < serve < tests < bench < stop < upload
    assert "/v2/health/ready" in job["steps"][serve]["run"]
    pytest_run = job["steps"][tests]["run"]
    assert '-m "e2e and not cpu_engine"' in pytest_run
    for option in ("--grpc-url", "--http-url", "--metrics-url"):
        assert option in pytest_run
        assert f'"{option}"' in (ROOT / "tests" / "conftest.py").read_text(), f"the suite has no {option} option"
    assert "--output results/bench.json" in job["steps"][bench]["run"]
    assert job["steps"][stop]["if"] == "always()" and job["steps"][upload]["if"] == "always()"
    assert job["steps"][upload]["with"]["path"] == "results/"
    assert "helm/bayling/values.yaml" in text, "the releases table comes from the chart"


def test_gpu_workflow_quality_check_builds_the_fp16_reference_and_runs_the_script():
    job = load(GPU)["jobs"]["engine"]
    step = next(s for s in job["steps"] if "quality" in s.get("name", "").lower())
    assert step["if"] == "inputs.quality_check"
    assert "--quant fp16" in step["run"]
    assert "benchmarks/quality_check.py --engine" in step["run"] and (ROOT / "benchmarks/quality_check.py").is_file()
