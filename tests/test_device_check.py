"""tools/device_check.sh, the one-command GPU check: it parses, its dry run lists every step
with the commands that would run (and these parse and select the CUDA tests), it stops at the
environment step without a GPU, and a failing or hanging step is recorded without stopping the
others. A fake ``$PYTHON`` (a shell script that logs its arguments) stands in for the steps."""

from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "device_check.sh"
STEPS = ["nvidia-smi", "environment", "tests", "time", "memory", "graph-breaks"]

pytestmark = pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("timeout") is None,
    reason="needs bash and coreutils' timeout",
)

# a stand-in interpreter: logs each call; FAKE_FAIL / FAKE_HANG name an argument that makes
# the call fail (exit 1) or hang (until the step's limit stops it)
FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$FAKE_CALLS"
for arg in "$@"; do
    if [[ -n "${FAKE_FAIL:-}" && "$arg" == "$FAKE_FAIL" ]]; then echo "fake failure"; exit 1; fi
    if [[ -n "${FAKE_HANG:-}" && "$arg" == "$FAKE_HANG" ]]; then exec sleep 30; fi
done
if [[ "$*" == *device_env.py* && -n "${FAKE_NO_GPU:-}" ]]; then
    echo "device_env: torch.cuda.is_available() is False: no GPU this torch can use"
    exit 3
fi
echo "fake run: $*"
"""


def run_script(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    fake = tmp_path / "fake_python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    full_env = {
        **os.environ,
        "PYTHON": str(fake),
        "FAKE_CALLS": str(tmp_path / "calls.log"),
        "OUT": str(tmp_path / "out"),
        **env,
    }
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=tmp_path,
        timeout=120,
    )


def calls(tmp_path: Path) -> list[str]:
    log = tmp_path / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def dry_run_commands(tmp_path: Path) -> dict[str, list[str]]:
    """``{step: argv}`` from the dry run's lines ``[step] timeout -k 10 LIMIT CMD... > FILE``."""
    run = run_script(tmp_path, "--dry-run")
    assert run.returncode == 0, run.stderr
    out = {}
    for line in run.stdout.splitlines():
        step, _, rest = line.partition("] ")
        words = shlex.split(rest)
        assert words[-2] == ">", line
        out[step.lstrip("[")] = words[:-2]
    return out


def test_the_script_parses():
    run = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_dry_run_lists_every_step_under_a_limit_and_runs_nothing(tmp_path):
    commands = dry_run_commands(tmp_path)
    assert list(commands) == STEPS
    assert calls(tmp_path) == [] and not (tmp_path / "out").exists()
    limits = {}
    for step, argv in commands.items():
        assert argv[0] == "timeout", step
        limits[step] = int(argv[3] if argv[1] == "-k" else argv[1])
    # each step bounded, about 8 minutes in all (not counting the kill grace)
    assert sum(limits.values()) <= 9 * 60, limits
    fake = str(tmp_path / "fake_python")
    assert commands["environment"][-2:] == [fake, "tools/device_env.py"]
    time_cmd = commands["time"]
    assert time_cmd[4:7] == [fake, "benchmarks/loss_overhead.py", "--device"]
    assert time_cmd[7] == "cuda"
    text = " ".join(time_cmd)
    assert "--sizes 256,512,1024" in text and "--pools 0,4096" in text
    assert "--no-memory" in text and "--no-graph-breaks" in text
    assert "--device cuda" in " ".join(commands["memory"]) and "--no-graph-breaks" in " ".join(
        commands["memory"]
    )
    assert "--device cuda" in " ".join(commands["graph-breaks"])
    assert "--no-memory" in commands["graph-breaks"]


def test_limits_can_be_set_per_step(tmp_path):
    run = run_script(tmp_path, "--dry-run", T_TESTS="7", T_GRAPH="9")
    lines = dict(line.split("] ", 1) for line in run.stdout.splitlines())
    assert lines["[tests"].startswith("timeout -k 10 7 ")
    assert lines["[graph-breaks"].startswith("timeout -k 10 9 ")


def test_the_benchmark_commands_parse(tmp_path, monkeypatch, capsys):
    """Each benchmark step's arguments are accepted by loss_overhead.py: with no GPU it reaches
    its availability check (return 2) instead of argparse's exit."""
    spec = importlib.util.spec_from_file_location(
        "loss_overhead", ROOT / "benchmarks" / "loss_overhead.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    commands = dry_run_commands(tmp_path)
    for step in ("time", "memory", "graph-breaks"):
        argv = commands[step]
        at = argv.index("benchmarks/loss_overhead.py")
        assert bench.main(argv[at + 1 :]) == 2, step
        assert "--device cuda, but torch.cuda.is_available() is False" in capsys.readouterr().err


def test_the_tests_step_selects_the_cuda_tests(tmp_path):
    argv = dry_run_commands(tmp_path)["tests"]
    at = argv.index("-m")
    collect = [sys.executable, *argv[at:], "--collect-only"]  # the step's -q: one id a line
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    run = subprocess.run(collect, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    ids = set(run.stdout.splitlines())
    for wanted in (
        "tests/test_compile.py::test_compiled_equals_eager_on_cuda",
        "tests/test_benchmark_loss_overhead.py::test_main_on_cuda_prints_every_table",
        "tests/test_benchmark_loss_overhead.py::test_time_cell_on_cuda_synchronises_around_every_timed_step",
        "tests/test_potential.py::test_expected_mode_on_each_device_equals_the_float64_equations[cuda-True]",
        "tests/test_checkpoint.py::test_cuda_tensors_load_on_cpu",
        "tests/test_checkpoint_rng.py::test_capture_restore_replays_identical_draws",
        "tests/test_distributed.py::test_single_process_is_a_no_op",
    ):
        assert wanted in ids, wanted
    # and not the CPU cases of the same files
    assert "tests/test_compile.py::test_compiled_equals_eager[infonce-in_batch]" not in ids


def test_without_a_gpu_it_stops_after_the_environment_step(tmp_path):
    run = run_script(tmp_path, FAKE_NO_GPU="1")
    assert run.returncode == 3
    assert run.stderr.startswith("device_check: stopped: torch with a usable GPU")
    assert "torch.cuda.is_available() is False" in run.stderr
    assert len(calls(tmp_path)) == 1 and "tools/device_env.py" in calls(tmp_path)[0]
    out = tmp_path / "out"
    assert "is_available() is False" in (out / "environment.txt").read_text()
    assert sorted(p.name for p in out.iterdir()) == [
        "environment.txt",
        "nvidia-smi.txt",
        "summary.md",
    ]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: it would run")
def test_the_real_environment_step_stops_here(tmp_path):
    """This machine's own Python, torch and package, not the fake: no GPU, so it stops early."""
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out")}
    run = subprocess.run(
        ["bash", str(SCRIPT)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
    )
    assert run.returncode == 3, run.stdout + run.stderr
    assert "torch.cuda.is_available() is False" in run.stderr
    assert f"torch {torch.__version__}" in (tmp_path / "out" / "environment.txt").read_text()


def test_a_failing_or_hanging_step_does_not_stop_the_others(tmp_path):
    # the tests fail; the time step (the only one with --warmup) hangs past its 1 s limit
    run = run_script(tmp_path, FAKE_FAIL="pytest", FAKE_HANG="--warmup", T_TIME="1")
    assert run.returncode == 1
    out = tmp_path / "out"
    assert run.stderr.strip().splitlines()[-1] == (
        f"device_check: failed or stopped: tests time (see the files in {out})"
    )
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
        for line in (out / "summary.md").read_text().splitlines()
        if line.startswith("| ") and not line.startswith("| step")
    }
    assert list(rows) == ["environment", "tests", "time", "memory", "graph-breaks"]
    assert [rows[s][0] for s in rows] == ["0", "1", "124 (stopped at the 1 s limit)", "0", "0"]
    assert [rows[s][3] for s in rows] == [
        "environment.txt",
        "tests_cuda.txt",
        "loss_overhead_time.md",
        "loss_overhead_memory.md",
        "loss_overhead_graph_breaks.md",
    ]
    logged = calls(tmp_path)
    # every step ran, in order, after the failure and the time-out
    assert [("device_env.py" in c, "pytest" in c, "--warmup" in c) for c in logged[:3]] == [
        (True, False, False),
        (False, True, False),
        (False, False, True),
    ]
    assert len(logged) == 5 and "--no-graph-breaks" in logged[3] and "--no-memory" in logged[4]
    assert "fake failure" in (out / "tests_cuda.txt").read_text()
    memory = (out / "loss_overhead_memory.md").read_text()
    assert (
        memory.startswith("$ ") and "fake run: benchmarks/loss_overhead.py --device cuda" in memory
    )


def test_every_step_passing_exits_0(tmp_path):
    run = run_script(tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().endswith(
        "device_check: every step passed; outputs in " + str(tmp_path / "out")
    )
    assert len(calls(tmp_path)) == 5


def test_the_docs_table_names_each_step_with_its_limit_and_output(tmp_path):
    """docs/benchmarks.md's "Running the GPU check" table follows the script: the same steps,
    limits and output files as the dry run."""
    text = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    section = text.split("## Running the GPU check\n", 1)[1].split("\n## ", 1)[0]
    rows = [
        [c.strip() for c in line.strip("|").split("|")]
        for line in section.splitlines()
        if line.startswith("| ") and not line.startswith("| step ")
    ]
    documented = {row[0].replace(" ", "-"): (row[2], row[3].strip("`")) for row in rows}
    run = run_script(tmp_path, "--dry-run")
    expected = {}
    for line in run.stdout.splitlines():
        step, _, rest = line.partition("] ")
        words = shlex.split(rest)
        limit = words[3] if words[1] == "-k" else words[1]
        expected[step.lstrip("[")] = (f"{limit} s", Path(words[-1]).name)
    assert documented == expected
