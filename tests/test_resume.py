"""Reliability of long runs: resume after SIGKILL or Ctrl-C with byte-identical results, a refused
mix of settings, a failed write that stops cleanly, and the sha256 manifest that `check` verifies."""

from __future__ import annotations

import importlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import invoke_cli, run_cli

from moeconvert.forward import carried, with_carried
from moeconvert.resume import Progress, RunState

ARGS = ["--bits", "4", "--group-size", "32", "--samples", "8", "--seq-len", "64", "--no-verify"]
ENV = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}


def quantize_cmd(model: Path, output: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "moeconvert.cli", "quantize", str(model), "-o", str(output), *ARGS, *extra]


def manifest(folder: Path) -> dict[str, str]:
    lines = (folder / "SHA256SUMS").read_text().splitlines()
    return {name: digest for digest, name in (line.split("  ", 1) for line in lines)}


def without_timings(report: dict) -> dict:
    """A quantization report without its wall-clock fields and output path (the runs wrote elsewhere)."""
    if isinstance(report, dict):
        return {k: without_timings(v) for k, v in report.items() if k not in ("seconds", "output")}
    if isinstance(report, list):
        return [without_timings(v) for v in report]
    return report


@pytest.fixture(scope="module")
def reference(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run; other runs write to a folder of the same name (the card quotes it)."""
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    subprocess.run(quantize_cmd(tiny_models["mixtral"], out), env=ENV, check=True, capture_output=True)
    return out


def run_until_paused(model: Path, output: Path, group: int) -> subprocess.Popen:
    """Start a real quantize run that stops after recording ``group`` (the test hook), and wait for it."""
    env = {**ENV, "MOECONVERT_TEST_PAUSE_AFTER": str(group)}
    proc = subprocess.Popen(quantize_cmd(model, output), env=env, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.startswith(f"paused after group {group}"):
            return proc
    raise AssertionError(f"the run ended before group {group} (exit {proc.wait()})")


def assert_same_output(resumed: Path, reference: Path) -> None:
    ours, theirs = manifest(resumed), manifest(reference)
    assert ours.keys() == theirs.keys()
    differing = {name for name in ours if ours[name] != theirs[name]}
    assert differing <= {"quantization_report.json"}, differing  # shards, index, configs, card identical
    report = json.loads((resumed / "quantization_report.json").read_text())
    assert without_timings(report) == without_timings(
        json.loads((reference / "quantization_report.json").read_text())
    )
    assert run_cli("check", str(resumed)).returncode == 0


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGKILL, -signal.SIGKILL), (signal.SIGINT, 130)])
def test_killed_run_resumes_to_identical_output(
    sig: signal.Signals, code: int, tiny_models: dict[str, Path], reference: Path, tmp_path: Path
) -> None:
    model, out = tiny_models["mixtral"], tmp_path / "out"
    proc = run_until_paused(model, out, group=2)  # embeddings and layers 0-1 are done
    proc.send_signal(sig)
    assert proc.wait(timeout=60) == code
    rest = proc.stderr.read()
    if sig == signal.SIGINT:
        errors = [
            line for line in rest.splitlines() if line.startswith("error: ")
        ]  # besides the progress bar
        assert len(errors) == 1 and "Traceback" not in rest, rest
        assert "interrupted" in errors[0] and "run the same command again to resume" in errors[0]
    partial = tmp_path / ".out.partial"
    assert not out.exists() and partial.is_dir()
    assert run_cli("check", str(partial)).returncode == 2  # not a finished output: no manifest
    assert json.loads((partial / ".resume" / "progress.json").read_text())["groups_done"] == 3

    force = ["--force"] if sig == signal.SIGINT else []  # replaces finished outputs, resumes same work
    resumed = subprocess.run(quantize_cmd(model, out, *force), env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "3 of 4 layers already done" in resumed.stderr
    assert not partial.exists() and not (out / ".resume").exists() and not (out / ".parts").exists()
    assert not (tmp_path / ".out.lock").exists()  # left by SIGKILL, taken over and removed
    assert_same_output(out, reference)


def test_a_second_run_on_an_output_being_written_is_refused(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """The command started again while the first run still writes: both would write one staging folder,
    and --force with other settings would delete the first run's work. The second is refused and the
    first is unharmed; the lock goes with the first run."""
    model, out = tiny_models["mixtral"], tmp_path / "out"
    proc = run_until_paused(model, out, group=1)
    try:
        for command in (
            ["quantize", str(model), "-o", str(out), *ARGS],
            ["quantize", str(model), "-o", str(out), *ARGS, "--bits", "8", "--force"],
            ["fuse", str(model), "-o", str(out)],
        ):
            second = invoke_cli(*command)
            assert second.returncode == 2, second.stderr
            assert second.stderr.startswith(f"error: another run is writing {out} now"), second.stderr
        progress = json.loads((tmp_path / ".out.partial" / ".resume" / "progress.json").read_text())
        assert progress["groups_done"] == 2
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
    assert (tmp_path / ".out.partial").is_dir() and not (tmp_path / ".out.lock").exists()


def test_hidden_states_go_on_from_the_record(tmp_path: Path) -> None:
    """On a CPU the hidden states carried to the next layer are the record's own mapped pages, which
    the OS may drop under memory pressure and read back, bit for bit what was recorded."""
    state = RunState(tmp_path, {"seed": 0})
    state.start()
    hidden = [torch.randn(2, 8, 16), torch.randn(1, 8, 16, dtype=torch.float64).to(torch.bfloat16)]
    carried = state.record(Progress(groups_done=1), hidden)
    assert [(t.dtype, t.shape) for t in carried] == [(t.dtype, t.shape) for t in hidden]
    assert all(torch.equal(a, b) for a, b in zip(carried, hidden, strict=True))
    spans = [
        [int(address, 16) for address in line.split()[0].split("-")]
        for line in Path("/proc/self/maps").read_text().splitlines()
        if line.endswith(str(state.hidden_path))
    ]
    assert spans and all(any(lo <= t.data_ptr() < hi for lo, hi in spans) for t in carried)
    assert state.record(Progress(groups_done=2), []) == []


def test_state_a_layer_hands_on_is_recorded_with_its_hidden_states(tmp_path: Path) -> None:
    """GLM-5's layers hand the next one their attention's picks of tokens with the hidden states: the
    record keeps them batch by batch, and a batch without any stays without."""
    state = RunState(tmp_path, {"seed": 0})
    state.start()
    picks = torch.randint(0, 8, (2, 8, 4), dtype=torch.int32)
    hidden = [with_carried(torch.randn(2, 8, 16), picks), torch.randn(2, 8, 16)]
    back = state.record(Progress(groups_done=1), hidden)
    assert torch.equal(carried(back[0]), picks) and carried(back[0]).dtype == torch.int32
    assert carried(back[1]) is None
    assert all(torch.equal(a, b) for a, b in zip(back, hidden, strict=True))
    assert torch.equal(carried(state.hidden(torch.device("cpu"))[0]), picks)


def test_a_run_resumed_at_a_layer_that_reads_the_previous_layers_picks_is_identical(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """GLM-5's layer 2 attends to the tokens layer 1's indexer picked: resumed after layer 1, it reads
    them from the record and the output is byte for byte an uninterrupted run's."""
    model = tiny_models["glm_moe_dsa"]
    reference = tmp_path / "reference" / "out"
    subprocess.run(quantize_cmd(model, reference), env=ENV, check=True, capture_output=True)
    out = tmp_path / "resumed" / "out"
    proc = run_until_paused(model, out, group=2)  # embeddings and layers 0-1 are done
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    resumed = subprocess.run(quantize_cmd(model, out), env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "layers already done" in resumed.stderr
    assert_same_output(out, reference)


def test_other_settings_or_a_changed_source_are_refused_and_force_starts_over(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    model, out = Path(shutil.copytree(tiny_models["mixtral"], tmp_path / "model")), tmp_path / "out"
    proc = run_until_paused(model, out, group=1)
    proc.kill()
    proc.wait()
    before = sorted(p.name for p in (tmp_path / ".out.partial" / ".parts").iterdir())
    mixed = subprocess.run(quantize_cmd(model, out, "--bits", "8"), env=ENV, capture_output=True, text=True)
    assert mixed.returncode == 2 and "other settings (scheme differ)" in mixed.stderr, mixed.stderr
    assert "--force" in mixed.stderr and len(mixed.stderr.strip().splitlines()) == 1

    shard = sorted(model.glob("*.safetensors"))[0]  # the folder rewritten in place since the partial
    stamp = shard.stat()
    os.utime(shard, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 10**9))
    changed = subprocess.run(quantize_cmd(model, out), env=ENV, capture_output=True, text=True)
    assert changed.returncode == 2 and "other settings (source_files differ)" in changed.stderr, (
        changed.stderr
    )
    assert sorted(p.name for p in (tmp_path / ".out.partial" / ".parts").iterdir()) == before  # kept

    fresh = subprocess.run(
        quantize_cmd(model, out, "--bits", "8", "--force"), env=ENV, capture_output=True, text=True
    )
    assert fresh.returncode == 0 and "already done" not in fresh.stderr, fresh.stderr
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert [g["weights"]["num_bits"] for g in config["config_groups"].values()] == [8]
    assert run_cli("check", str(out)).returncode == 0 and not (tmp_path / ".out.partial").exists()


def test_a_failed_write_stops_cleanly_and_resumes(
    tiny_models: dict[str, Path], reference: Path, tmp_path: Path
) -> None:
    """A file-size limit (like a full disk) hits while the shards are assembled: the run stops with one
    line, nothing appears at the output path, and the finished layers complete on a rerun."""
    model, out = tiny_models["mixtral"], tmp_path / "out"
    largest_part = 140_000  # every per-layer part and the hidden states are smaller; the shard is not

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (largest_part, largest_part))

    failed = subprocess.run(
        quantize_cmd(model, out), env=ENV, capture_output=True, text=True, preexec_fn=limit_file_size
    )
    assert failed.returncode == 2, failed.stderr
    lines = [line for line in failed.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in failed.stderr, failed.stderr
    assert "cannot write the output (File too large)" in lines[0] and "run the same command again" in lines[0]
    assert not out.exists()
    assert run_cli("check", str(out)).returncode == 2
    assert run_cli("check", str(tmp_path / ".out.partial")).returncode == 2

    resumed = subprocess.run(quantize_cmd(model, out), env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0 and "4 of 4 layers already done" in resumed.stderr, resumed.stderr
    assert_same_output(out, reference)


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def test_assembly_frees_each_part_with_its_shard_and_resumes(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """Assembling the shards deletes each layer's part as soon as the shard holding it is on disk, so
    the disk never holds the output twice over; a run killed during assembly writes only the shards that
    were not finished, and the result is an uninterrupted run's."""
    model, small = tiny_models["mixtral"], ["--max-shard-size", "120KB"]
    reference = tmp_path / "uninterrupted" / "out"
    subprocess.run(quantize_cmd(model, reference, *small), env=ENV, check=True, capture_output=True)
    shards = sorted(reference.glob("model-*.safetensors"))
    assert len(shards) >= 4, shards
    output_bytes = sum(path.stat().st_size for path in shards)

    out = tmp_path / "out"
    env = {**ENV, "MOECONVERT_TEST_PAUSE_AFTER": "shard1"}
    proc = subprocess.Popen(quantize_cmd(model, out, *small), env=env, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.startswith("paused after shard 1"):
            break
    else:
        raise AssertionError(f"the run ended before assembling shard 1 (exit {proc.wait()})")
    staging = tmp_path / ".out.partial"
    parts = sorted((staging / ".parts").glob("*.safetensors"))
    written = sorted(staging.glob("model-*.safetensors"))
    assert [p.name for p in written[:2]] == [s.name for s in shards[:2]]
    assert manifest(reference)[written[0].name] == sha256_of(written[0])
    in_flight = max(path.stat().st_size for path in shards) * 2
    on_disk = folder_bytes(staging / ".parts") + sum(path.stat().st_size for path in written)
    assert on_disk <= output_bytes + in_flight, (on_disk, output_bytes)  # not parts and shards in full
    record = json.loads((staging / ".parts" / "assembly.json").read_text())
    assert set(record["done"]) >= {s.name for s in shards[:2]}
    assert "000000.safetensors" not in {p.name for p in parts}  # shard 0's parts are gone
    assert 0 < len(parts) < len(record["parts"]), (parts, record["parts"])
    proc.kill()
    proc.wait()

    resumed = subprocess.run(quantize_cmd(model, out, *small), env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_output(out, reference)


def sha256_of(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_check_finds_truncated_altered_missing_and_extra_files(reference: Path, tmp_path: Path) -> None:
    import shutil

    folder = Path(shutil.copytree(reference, tmp_path / "copy"))
    assert subprocess.run(["sha256sum", "--check", "--quiet", "SHA256SUMS"], cwd=folder).returncode == 0
    ok = run_cli("check", str(folder))
    assert ok.returncode == 0 and ok.stdout.startswith("ok: 5 files")

    shard = folder / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-1])
    assert "changed: model.safetensors" in run_cli("check", str(folder)).stderr
    shard.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])  # one bit, same size
    flipped = run_cli("check", str(folder))
    assert flipped.returncode == 1 and "changed: model.safetensors" in flipped.stderr
    shard.write_bytes(data)
    (folder / "config.json").unlink()
    (folder / "stray.bin").write_bytes(b"x")
    both = run_cli("check", str(folder), "--json")
    result = json.loads(both.stdout)
    assert (
        both.returncode == 1
        and result["missing"] == ["config.json"]
        and result["unexpected"] == ["stray.bin"]
    )
    assert not result["passed"] and result["changed"] == []


def test_fuse_stops_cleanly_when_a_write_fails(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    model, out = tiny_models["mixtral"], tmp_path / "fused"
    before = {p.name: p.read_bytes() for p in model.iterdir()}

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))

    cmd = [sys.executable, "-m", "moeconvert.cli", "fuse", str(model), "-o", str(out)]
    failed = subprocess.run(cmd, env=ENV, capture_output=True, text=True, preexec_fn=limit_file_size)
    assert failed.returncode == 2, failed.stderr
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in failed.stderr, failed.stderr
    assert "(File too large); nothing was written" in errors[0]
    assert not out.exists() and not list(tmp_path.glob(".fused*"))
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before


def test_ctrl_c_in_the_parity_check_says_the_output_is_unverified(
    tiny_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The output is complete and in place when its parity check starts: Ctrl-C there (a
    KeyboardInterrupt, as Python delivers SIGINT) says so, and the card does not claim --no-verify."""
    from moeconvert.errors import InterruptedRunError
    from moeconvert.pipeline import QuantizeOptions, quantize
    from moeconvert.quant.scheme import Scheme

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module("moeconvert.verify"), "verify", interrupted)
    out = tmp_path / "out"
    options = QuantizeOptions(samples=4, seq_len=32)
    with pytest.raises(
        InterruptedRunError, match="is complete but not verified: check it with `moeconvert verify"
    ):
        quantize(
            str(tiny_models["olmoe"]),
            Scheme(bits=4, group_size=32),
            output=out,
            options=options,
            progress=False,
        )
    assert run_cli("check", str(out)).returncode == 0
    card = (out / "README.md").read_text()
    assert "Not verified" in card and "did not finish" in card and not (out / "verify_report.json").exists()
