"""`bayling merge`: apply / make / verify a weight difference, on small LLaMA-shaped checkpoints."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bayling.build_engine.checkpoint import CheckpointReader
from bayling.build_engine.merge import MANIFEST, JOURNAL, Options, make_diff, merge, verify
from bayling.cli import main as cli_main
from bayling.errors import BaylingError

from ._merge_helpers import (add16, diff16, files_of, fine_tune, llama_config, load_output, random_model,
                             same_bits, save_checkpoint)

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> int:
    return cli_main(["merge", *map(str, args)])


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """base (LLaMA), target (its fine-tune), the float16 delta, and a wrong base of the same shapes and scale."""
    root = tmp_path_factory.mktemp("models")
    base = random_model(1)
    target = fine_tune(base, 2)
    delta = diff16(target, base)
    wrong = random_model(3)
    return {
        "root": root, "B": base, "T": target, "D": delta, "W": wrong,
        "base": save_checkpoint(root / "base", base, "safetensors", shards=3),
        "base_bin": save_checkpoint(root / "base_bin", base, "bin", shards=2, index=False),
        "target": save_checkpoint(root / "target", target, "safetensors", shards=2, index=False),
        "delta": save_checkpoint(root / "delta", delta, "bin", shards=3),
        "delta_st": save_checkpoint(root / "delta_st", delta, "safetensors", shards=1, index=False),
        "wrong": save_checkpoint(root / "wrong", wrong, "safetensors", shards=2),
    }


def assert_no_output(out: Path) -> None:
    """Nothing that looks like a finished (or any) model is left behind."""
    if out.exists():
        names = {p.name for p in out.iterdir()}
        assert MANIFEST not in names and "model.safetensors.index.json" not in names, names
        assert not [n for n in names if n.endswith(".safetensors")], names


# ---------------------------------------------------------------------------------------------------------
# Results


@pytest.mark.parametrize("base_key,delta_key", [("base", "delta"), ("base_bin", "delta_st")])
def test_merge_equals_naive_float16_addition(model, tmp_path, base_key, delta_key):
    out = tmp_path / "out"
    assert run_cli("--base", model[base_key], "--delta", model[delta_key], "--output", out,
                   "--max-shard-size", "60KB") == 0
    merged = load_output(out)
    expected = add16(model["B"], model["D"])
    assert set(merged) == set(expected)
    for name in expected:
        assert same_bits(merged[name], expected[name]), name
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 3 and all(p.stat().st_size <= 60_000 + 4096 for p in shards)
    for name in ("config.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                 "generation_config.json"):
        assert (out / name).read_bytes() == (model[delta_key] / name).read_bytes()
    man = json.loads((out / MANIFEST).read_text())
    assert man["mode"] == "merge" and man["base_check"]["verdict"] == "ok"
    assert man["base_check"]["judged"] == 16
    assert all(t["stats"]["inexact"] == 0 for t in man["tensors"].values())
    assert not list(out.glob("*.tmp")) and not (out / JOURNAL).exists()


def test_matches_original_apply_delta_with_transformers(model, tmp_path):
    """BayLing's apply_delta.py: both models whole in float16, param.data += base; then load ours the same way."""
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(model["base"], dtype=torch.float16)
    delta = LlamaForCausalLM.from_pretrained(model["delta"], dtype=torch.float16)
    base_sd = base.state_dict()
    for name, param in delta.state_dict().items():
        assert name in base_sd
        param.data += base_sd[name]
    out = tmp_path / "out"
    merge(model["base"], model["delta"], out)
    ours = LlamaForCausalLM.from_pretrained(out, dtype=torch.float16).state_dict()
    theirs = delta.state_dict()
    assert set(ours) == set(theirs)
    for name in theirs:
        assert same_bits(ours[name], theirs[name]), name


def test_merge_then_make_diff_round_trips_exactly(model, tmp_path):
    merged, diff = tmp_path / "merged", tmp_path / "diff"
    assert run_cli("--base", model["base"], "--delta", model["delta"], "--output", merged) == 0
    assert run_cli("--make-diff", "--base", model["base"], "--target", merged, "--output", diff,
                   "--max-shard-size", "100KB") == 0
    got = load_output(diff)
    for name, d in model["D"].items():
        assert same_bits(got[name], d), name
    # and back again: merging the new delta gives the merged model's bytes
    again = tmp_path / "again"
    assert run_cli("--base", model["base"], "--delta", diff, "--output", again) == 0
    a, b = files_of(merged), files_of(again)
    assert {n: v for n, v in a.items() if n != MANIFEST} == {n: v for n, v in b.items() if n != MANIFEST}


def test_make_diff_equals_float16_subtraction_and_restores_target(tmp_path):
    # weights away from zero: target - base is exact in float16 everywhere, so base + delta gives the target back
    base = {n: (t.float().sign() * (0.01 + t.float().abs())).half() for n, t in random_model(4).items()}
    target = fine_tune(base, 6, rel=0.003)
    b = save_checkpoint(tmp_path / "b", base, "bin", shards=2)
    t = save_checkpoint(tmp_path / "t", target, "safetensors", shards=2)
    d = tmp_path / "d"
    assert run_cli("--make-diff", "--base", b, "--target", t, "--output", d) == 0
    delta = load_output(d)
    for name in target:
        assert same_bits(delta[name], target[name] - base[name]), name
    man = json.loads((d / MANIFEST).read_text())
    assert man["mode"] == "make-diff" and all(x["stats"]["base_fingerprint"] for x in man["tensors"].values())
    out = tmp_path / "out"
    assert run_cli("--base", b, "--delta", d, "--output", out) == 0
    restored = load_output(out)
    for name in target:
        assert same_bits(restored[name], target[name]), name
    assert json.loads((out / MANIFEST).read_text())["base_check"]["recorded_fingerprints"] == len(target)


def test_other_dtypes_are_merged_in_float16(tmp_path):
    """A float32 base and a bfloat16 delta: both converted to float16 first, as apply_delta.py does."""
    base = random_model(7, dtype=torch.float32)
    delta = {n: (t * 0.01).to(torch.bfloat16) for n, t in random_model(8).items()}
    b = save_checkpoint(tmp_path / "b", base, "safetensors", shards=2)
    d = save_checkpoint(tmp_path / "d", delta, "bin", shards=2)
    out = tmp_path / "out"
    merge(b, d, out, Options(skip_base_check=True))
    merged = load_output(out)
    for name in base:
        assert same_bits(merged[name], base[name].half() + delta[name].half()), name


def test_legacy_bin_tied_weights_and_integer_buffers(tmp_path):
    base = random_model(9)
    target = fine_tune(base, 10)
    delta = diff16(target, base)
    for sd in (base, delta):
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]  # tied: one storage, two names
    base["model.rotary.positions"] = torch.arange(16)
    delta["model.rotary.positions"] = torch.arange(16) * 2
    b = save_checkpoint(tmp_path / "b", base, "bin-legacy", shards=1, index=False)
    d = save_checkpoint(tmp_path / "d", delta, "bin", shards=1, index=False)
    out = tmp_path / "out"
    assert run_cli("--base", b, "--delta", d, "--output", out) == 0
    merged = load_output(out)
    assert torch.equal(merged["model.rotary.positions"], delta["model.rotary.positions"])  # carried over
    assert same_bits(merged["lm_head.weight"], base["lm_head.weight"] + delta["lm_head.weight"])
    assert same_bits(merged["lm_head.weight"], merged["model.embed_tokens.weight"])


def test_chunking_does_not_change_bytes_or_statistics(tmp_path):
    """Tensors split in many chunks (and sampled, when large) give the same output as in one piece."""
    dims = dict(vocab=2048, hidden=160, inter=300, layers=1)  # embed/lm_head: 327680 elements > the sample size
    base = random_model(11, **dims)
    delta = diff16(fine_tune(base, 12), base)
    b = save_checkpoint(tmp_path / "b", base, config=llama_config(**dims))
    d = save_checkpoint(tmp_path / "d", delta, "bin", config=llama_config(**dims))
    merge(b, d, tmp_path / "one", Options())
    merge(b, d, tmp_path / "many", Options(chunk_bytes=10_000))
    assert files_of(tmp_path / "one") == files_of(tmp_path / "many")
    man = json.loads((tmp_path / "one" / MANIFEST).read_text())
    lm = man["tensors"]["lm_head.weight"]["stats"]
    assert lm["sampled"] < 327680 and lm["inexact"] == 0 and 0.005 < lm["ratio"] < 0.02


def test_reader_lists_and_reads_all_formats(model):
    for key in ("base", "base_bin", "delta", "delta_st"):
        with CheckpointReader(model[key]) as r:
            ref = model["B"] if key.startswith("base") else model["D"]
            assert set(r.tensors) == set(ref)
            for name, t in ref.items():
                info = r.tensors[name]
                assert info.shape == tuple(t.shape) and info.dtype == "F16" and info.nbytes == t.numel() * 2
                assert same_bits(r.read(name), t)
                assert same_bits(r.read_range(name, 3, 40), t.reshape(-1)[3:40])


# ---------------------------------------------------------------------------------------------------------
# Faults: a clear error, and no output that looks complete


def test_missing_parameter(model, tmp_path, capsys):
    base = dict(model["B"])
    del base["model.layers.1.mlp.up_proj.weight"]
    b = save_checkpoint(tmp_path / "b", base)
    out = tmp_path / "out"
    assert run_cli("--base", b, "--delta", model["delta"], "--output", out) == 1
    err = capsys.readouterr().err
    assert err.startswith("bayling merge: error: missing parameter") and "'model.layers.1.mlp.up_proj.weight'" in err
    assert err.count("\n") == 1
    assert not out.exists()


def test_shape_mismatch(model, tmp_path, capsys):
    base = dict(model["B"])
    base["model.embed_tokens.weight"] = torch.zeros(257, 64, dtype=torch.float16)
    b = save_checkpoint(tmp_path / "b", base)
    out = tmp_path / "out"
    assert run_cli("--base", b, "--delta", model["delta"], "--output", out) == 1
    err = capsys.readouterr().err
    assert "shape mismatch for tensor 'model.embed_tokens.weight': base [257, 64], delta [256, 64]" in err
    assert not out.exists()


def test_dtype_mismatch(model, tmp_path, capsys):
    base = dict(model["B"])
    base["model.norm.weight"] = torch.ones(64, dtype=torch.int32)
    b = save_checkpoint(tmp_path / "b", base)
    out = tmp_path / "out"
    assert run_cli("--base", b, "--delta", model["delta"], "--output", out) == 1
    assert "dtype mismatch for tensor 'model.norm.weight': base I32, delta F16" in capsys.readouterr().err
    assert not out.exists()


def test_not_enough_disk_space_is_checked_up_front(model, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli("--base", model["base"], "--delta", model["delta"], "--output", out, "--keep-free", "1000PB") == 1
    err = capsys.readouterr().err
    assert re.search(r"not enough free disk space for \S+: the output needs [\d.]+ KiB more and 909494.7 TiB must "
                     r"stay free \(--keep-free\), but the file system has [\d.]+ [GT]iB free", err), err
    assert not out.exists()


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_truncated_shard(model, tmp_path, capsys, fmt):
    b = save_checkpoint(tmp_path / "b", model["B"], fmt, shards=3)
    shard = sorted(b.glob(f"*.{fmt}"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    assert run_cli("--base", b, "--delta", model["delta"], "--output", out) == 1
    err = capsys.readouterr().err
    assert shard.name in err and "truncated" in err
    assert not out.exists()


def test_damaged_or_missing_shard(model, tmp_path, capsys):
    b = save_checkpoint(tmp_path / "b", model["B"], "safetensors", shards=3)
    shards = sorted(b.glob("*.safetensors"))
    shards[0].write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + b"\0" * 100)
    assert run_cli("--base", b, "--delta", model["delta"], "--output", tmp_path / "out") == 1
    assert "damaged or not a safetensors file" in capsys.readouterr().err
    shards[0].unlink()
    assert run_cli("--base", b, "--delta", model["delta"], "--output", tmp_path / "out") == 1
    assert f"lists {shards[0].name}, which is missing" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bin_with_pickled_code_is_refused(model, tmp_path, capsys):
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    d = tmp_path / "d"
    d.mkdir()
    (d / "config.json").write_text("{}")
    torch.save({"model.norm.weight": torch.zeros(64), "extra": Payload()}, d / "pytorch_model.bin")
    assert run_cli("--base", model["base"], "--delta", d, "--output", tmp_path / "out") == 1
    assert "refusing to load" in capsys.readouterr().err
    assert not (tmp_path / "pwned").exists()


def test_wrong_base_of_same_shapes_is_caught_early(model, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli("--base", model["wrong"], "--delta", model["delta"], "--output", out) == 1
    err = capsys.readouterr().err
    assert "the base model does not match this delta: 3 of the first 3 weight matrices" in err
    assert "--skip-base-check" in err and "Llama-2" in err
    assert err.count("\n") == 1
    assert not out.exists()


def test_swapped_base_and_delta_is_caught(model, tmp_path, capsys):
    assert run_cli("--base", model["delta_st"], "--delta", model["base"], "--output", tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert "rms(delta)/rms(base) = " in err and "swapped" in err
    assert_no_output(tmp_path / "out")


def test_skip_base_check_merges_and_records_the_statistics(model, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli("--base", model["wrong"], "--delta", model["delta"], "--output", out, "--skip-base-check") == 0
    assert "warning: base check: 16 of 16 matrices" in capsys.readouterr().err
    man = json.loads((out / MANIFEST).read_text())
    assert man["base_check"]["verdict"] == "skipped" and len(man["base_check"]["failed"]) == 16
    inexact = [t["stats"]["inexact"] for n, t in man["tensors"].items() if "norm" not in n]
    assert min(inexact) > 0.15  # a wrong base: a large fraction of elements round
    merged = load_output(out)
    assert same_bits(merged["lm_head.weight"], model["W"]["lm_head.weight"] + model["D"]["lm_head.weight"])


def test_make_diff_against_an_unrelated_base_is_refused(model, tmp_path, capsys):
    out = tmp_path / "d"
    assert run_cli("--make-diff", "--base", model["wrong"], "--target", model["target"], "--output", out) == 1
    assert "the target does not look like a fine-tune of this base" in capsys.readouterr().err
    assert_no_output(out)


def test_fingerprint_from_make_diff_catches_a_slightly_different_base(model, tmp_path, capsys):
    d = tmp_path / "d"
    make_diff(model["base"], model["target"], d)
    other = dict(model["B"])
    name = "model.layers.1.self_attn.v_proj.weight"
    other[name] = fine_tune({name: other[name]}, 13, rel=0.001)[name]  # a re-converted copy, say
    b = save_checkpoint(tmp_path / "b", other)
    out = tmp_path / "out"
    assert run_cli("--base", b, "--delta", d, "--output", out) == 1
    err = capsys.readouterr().err
    assert f"tensor '{name}'" in err and "fingerprint" in err
    assert_no_output(out)


# ---------------------------------------------------------------------------------------------------------
# Safe output: existing output, verify, resume after a kill


def test_rerun_is_a_no_op_and_a_different_output_needs_force(model, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli("--base", model["base"], "--delta", model["delta"], "--output", out) == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    assert run_cli("--base", model["base"], "--delta", model["delta"], "--output", out) == 0
    assert "already complete and verified" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    # another merge into the same folder: refused without --force
    assert run_cli("--base", model["wrong"], "--delta", model["delta"], "--output", out, "--skip-base-check") == 1
    assert "already holds a finished merge of other inputs" in capsys.readouterr().err
    (out / "notes.txt").write_text("mine")
    assert run_cli("--base", model["wrong"], "--delta", model["delta"], "--output", out, "--skip-base-check",
                   "--force", "--max-shard-size", "50KB") == 0
    verify(out)
    assert (out / "notes.txt").read_text() == "mine"
    assert set(load_output(out)) == set(model["D"])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert {p.name for p in out.glob("model-*.safetensors")} == set(index["weight_map"].values())
    assert len(set(index["weight_map"].values())) > 3


def test_verify_detects_changed_and_missing_files(model, tmp_path, capsys):
    out = tmp_path / "out"
    merge(model["base"], model["delta"], out, Options(max_shard_size=100_000))
    assert run_cli("--verify", out) == 0
    assert "OK (merge, 21 tensors" in capsys.readouterr().out
    shard = sorted(out.glob("model-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x40
    shard.write_bytes(bytes(data))
    assert run_cli("--verify", out) == 1
    assert f"{shard.name} differs from the manifest" in capsys.readouterr().err
    (out / "tokenizer.model").unlink()
    assert run_cli("--verify", out) == 1
    assert "tokenizer.model is missing" in capsys.readouterr().err
    # the same merge command repairs it: only the damaged shard is written again
    good = {p.name: p.stat().st_mtime_ns for p in out.glob("model-*.safetensors") if p != shard}
    assert run_cli("--base", model["base"], "--delta", model["delta"], "--output", out,
                   "--max-shard-size", "100KB") == 0
    assert f"{shard.name} is missing or changed" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("model-*.safetensors") if p != shard} == good
    assert run_cli("--verify", out) == 0
    merged = load_output(out)
    assert all(same_bits(merged[n], t) for n, t in add16(model["B"], model["D"]).items())


def _kill_after_shards(args: list[str], out: Path, shards: int) -> subprocess.Popen:
    """Start `bayling merge`, SIGKILL it as soon as its journal records `shards` finished shards."""
    proc = subprocess.Popen([sys.executable, "-m", "bayling.cli", "merge", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    journal = out / JOURNAL
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        try:
            if len(json.loads(journal.read_text())["done"]) >= shards:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.0005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    return proc


def test_killed_merge_resumes_to_identical_bytes(tmp_path):
    dims = dict(vocab=1024, hidden=256, inter=688, layers=4)
    base = random_model(21, **dims)
    delta = diff16(fine_tune(base, 22), base)
    b = save_checkpoint(tmp_path / "b", base, "safetensors", shards=2, config=llama_config(**dims))
    d = save_checkpoint(tmp_path / "d", delta, "bin", shards=2, config=llama_config(**dims))
    ref = tmp_path / "ref"
    merge(b, d, ref, Options(max_shard_size=200_000))
    count = len(list(ref.glob("model-*.safetensors")))
    assert count == 31

    out = tmp_path / "out"
    args = ["--base", str(b), "--delta", str(d), "--output", str(out), "--max-shard-size", "200KB"]
    proc = _kill_after_shards(args, out, 2)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / MANIFEST).exists() and (out / JOURNAL).exists()
    with pytest.raises(BaylingError, match="unfinished merge"):
        verify(out)
    finished = sorted(out.glob("model-*.safetensors"))
    assert 2 <= len(finished) < count
    # damage the first finished shard; the second must be kept as it is
    first, second = out / "model-00001-of-00031.safetensors", out / "model-00002-of-00031.safetensors"
    data = bytearray(first.read_bytes())
    data[100] ^= 1
    first.write_bytes(bytes(data))
    kept_mtime = second.stat().st_mtime_ns

    rerun = subprocess.run([sys.executable, "-m", "bayling.cli", "merge", *args], cwd=REPO, capture_output=True,
                           text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming" in rerun.stderr and f"{first.name} is missing or changed" in rerun.stderr
    assert "kept from an earlier run" in rerun.stdout
    assert second.stat().st_mtime_ns == kept_mtime
    assert files_of(out) == files_of(ref)
    verify(out)


def test_help_explains_the_three_modes():
    res = subprocess.run([sys.executable, "-m", "bayling.cli", "merge", "--help"], cwd=REPO, capture_output=True,
                         text=True)
    assert res.returncode == 0
    for usage in ("bayling merge --base LLAMA_DIR --delta DELTA_DIR --output OUT_DIR",
                  "bayling merge --make-diff --base LLAMA_DIR --target TARGET_DIR --output DELTA_DIR",
                  "bayling merge --verify OUT_DIR", "--skip-base-check", "--max-shard-size"):
        assert usage in res.stdout
    # `bayling merge --help` and the dispatcher stay light: no torch until a merge runs
    res = subprocess.run([sys.executable, "-c", "import sys, bayling.build_engine.merge_cli; "
                          "print('torch' in sys.modules, 'safetensors' in sys.modules)"],
                         cwd=REPO, capture_output=True, text=True)
    assert res.stdout.split() == ["False", "False"]


def test_mode_arguments_are_checked(model, tmp_path, capsys):
    assert run_cli("--base", model["base"], "--output", tmp_path / "o") == 1
    assert "missing --delta" in capsys.readouterr().err
    assert run_cli("--make-diff", "--base", model["base"], "--delta", model["delta"], "--output", tmp_path / "o") == 1
    assert "--delta does not belong to this mode" in capsys.readouterr().err
    assert run_cli("--base", model["base"], "--delta", model["delta"], "--output", model["delta"]) == 1
    assert "is the delta folder" in capsys.readouterr().err


# Runs `bayling merge ARGS...` and SIGKILLs it at the rename of the Nth file written under NAME, so the file is
# left exactly as the real writer leaves it mid-write: complete under its temporary name, not yet renamed.
_KILL_AT_RENAME = """
import os, signal, sys
from pathlib import Path
name, nth, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
real, seen = os.replace, [0]
def replace(src, dst, *a, **k):
    if Path(dst).name == name:
        seen[0] += 1
        if seen[0] == nth:
            print(Path(src).name, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst, *a, **k)
os.replace = replace
from bayling.cli import main
sys.exit(main(["merge", *args]))
"""


@pytest.mark.parametrize("name,nth,left", [
    (JOURNAL, 1, set()),                                        # the very first journal write: nothing else yet
    (JOURNAL, 2, {JOURNAL, "model-00001-of-00003.safetensors"}),  # a journal update, beside the previous journal
    ("model-00001-of-00003.safetensors", 1, {JOURNAL}),         # a shard, beside the journal
    (MANIFEST, 1, None),                                        # the manifest, beside everything else
])
def test_kill_at_any_atomic_write_resumes_to_identical_bytes(model, tmp_path, name, nth, left):
    ref = tmp_path / "ref"
    merge(model["base"], model["delta"], ref, Options(max_shard_size=100_000))
    assert len(list(ref.glob("model-*.safetensors"))) == 3
    out = tmp_path / "out"
    args = ["--base", str(model["base"]), "--delta", str(model["delta"]), "--output", str(out),
            "--max-shard-size", "100KB"]
    killed = subprocess.run([sys.executable, "-c", _KILL_AT_RENAME, name, str(nth), *args], cwd=REPO,
                            capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    tmp = killed.stdout.strip()
    assert tmp and tmp != name and (out / tmp).is_file()
    names = {p.name for p in out.iterdir()}
    assert names - {tmp} == (left if left is not None else (set(files_of(ref)) - {MANIFEST}) | {JOURNAL})

    assert run_cli(*args) == 0
    assert files_of(out) == files_of(ref)
    assert verify(out)["leftovers"] == []


def test_leftover_temporary_file_does_not_hide_someone_elses_files(model, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--base", model["base"], "--delta", model["delta"], "--output", out]
    killed = subprocess.run([sys.executable, "-c", _KILL_AT_RENAME, JOURNAL, "1", *map(str, args)], cwd=REPO,
                            capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (out / "notes.txt").write_text("mine")
    before = files_of(out)
    assert run_cli(*args) == 1
    assert "already holds other files" in capsys.readouterr().err
    assert files_of(out) == before
