"""The HPC examples: the dask-jobqueue SLURMCluster's job script, and the SLURM batch script run for real
with a stand-in `srun` that starts real `dask worker` processes on this machine (no SLURM needed)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "hpc"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"hpc_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_jobqueue_job_script_requests_gpus_and_points_at_the_scheduler():
    pytest.importorskip("dask_jobqueue")
    example = load_example("jobqueue_slurm")
    # Builds the cluster (its scheduler runs in this process) without submitting any job.
    cluster = example.make_cluster(
        queue="gpu",
        account="proj42",
        cores=4,
        memory="16GB",
        walltime="01:30:00",
        dashboard_address=":0",
        job_script_prologue=["source ~/venvs/dlearner/bin/activate"],
    )
    try:
        script = cluster.job_script()
        assert cluster.scheduler_address in script
        assert "--resources GPU=1" in script
        sbatch = [line for line in script.splitlines() if line.startswith("#SBATCH")]
        assert "#SBATCH --gres=gpu:1" in sbatch
        assert "#SBATCH -p gpu" in sbatch and "#SBATCH -A proj42" in sbatch
        assert "#SBATCH -t 01:30:00" in sbatch and "#SBATCH --cpus-per-task=4" in sbatch
        assert "source ~/venvs/dlearner/bin/activate" in script
        # One thread per worker, as docs/hpc.md says, while SLURM still gives the job its 4 cores.
        (worker,) = [line for line in script.splitlines() if "distributed.cli.dask_worker" in line]
        assert re.search(r"--nthreads 1( |$)", worker), worker
        # The interpreter is looked up on the compute node (after the prologue), not this machine's path.
        assert worker.startswith("python -m distributed.cli.dask_worker "), worker
        assert sys.executable not in script and str(Path(sys.executable).parent) not in script
        assert not cluster.workers  # nothing was submitted
    finally:
        cluster.close()


def test_jobqueue_make_cluster_rejects_zero_gpus():
    pytest.importorskip("dask_jobqueue")
    with pytest.raises(ValueError, match="gpus_per_job"):
        load_example("jobqueue_slurm").make_cluster(gpus_per_job=0)


def test_slurm_batch_script_is_valid_bash_and_uses_a_scheduler_file_with_gpu_workers():
    bash = shutil.which("bash")
    assert bash is not None, "bash is needed to check the SLURM example"
    script_path = EXAMPLES / "slurm_job.sh"
    subprocess.run([bash, "-n", str(script_path)], check=True, capture_output=True, text=True)
    script = script_path.read_text()
    assert script.startswith("#!/usr/bin/env bash")
    assert "#SBATCH --gres=gpu" in script
    assert re.search(r"^dask scheduler --scheduler-file ", script, re.M)
    worker = re.search(r"dask worker --scheduler-file [^\n]+\n[^\n]+", script).group(0)
    assert "--nthreads 1" in worker and "--nworkers 1" in worker
    assert "WORKER_GPUS=(--resources GPU=1)" in script
    train = script[script.index("dlearner train") :]
    assert "--scheduler-file" in train and "--checkpoint" in train and "--num-gpus-per-learner 1" in train


# ---------------------------------------------------------------- slurm_job.sh, run for real
STAND_IN_SRUN = """#!/usr/bin/env bash
# Stand-in for SLURM's srun in tests: starts the command once per task on this machine.
ntasks="${SLURM_NTASKS:-1}"
while [[ $# -gt 0 && "$1" == -* ]]; do
    case "$1" in --ntasks=*) ntasks="${1#--ntasks=}" ;; esac
    shift
done
pids=()
for _ in $(seq "$ntasks"); do "$@" & pids+=($!); done
trap 'kill "${pids[@]}" 2>/dev/null; wait' TERM INT
wait
"""
FAST_TRAIN = (
    "--fcnet-hiddens 16,16 --train-batch-size 256 --minibatch-size 128 --num-epochs 1 --num-envs-per-env-runner 4 --seed 0"
)


def job_environment(tmp_path: Path, busy_port: int, train_args: str) -> Dict[str, str]:
    """What SLURM would set for a 2-task job, plus the script's own settings for a tiny CPU run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    srun = bin_dir / "srun"
    srun.write_text(STAND_IN_SRUN)
    srun.chmod(0o755)
    venv_bin = str(Path(sys.executable).parent)  # dask, dlearner and python of the environment under test
    return {
        **os.environ,
        "PATH": os.pathsep.join([str(bin_dir), venv_bin, os.environ.get("PATH", "")]),
        "SLURM_SUBMIT_DIR": str(tmp_path),
        "SLURM_JOB_ID": "4242",
        "SLURM_NTASKS": "2",
        "SLURM_CPUS_PER_TASK": "1",
        "TMPDIR": str(tmp_path),
        "RUN_DIR": str(tmp_path / "run"),
        "NUM_LEARNERS": "1",
        "NUM_ENV_RUNNERS": "1",
        "GPUS_PER_LEARNER": "0",
        "DASHBOARD_PORT": str(busy_port),
        "TRAIN_ARGS": f"{train_args} {FAST_TRAIN}",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def start_job(env: Dict[str, str]) -> subprocess.Popen:
    # Its own session, like a batch job: the test can check afterwards that nothing of it is left.
    return subprocess.Popen(
        ["bash", str(EXAMPLES / "slurm_job.sh")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def finish_job(proc: subprocess.Popen, timeout: float = 300):
    """``(stdout, stderr, leftovers)``: ``leftovers`` lists processes of the job still running 15 s after
    the script ended (they are killed, so a failing test leaves nothing behind either)."""
    import time

    try:
        out, err = proc.communicate(timeout=timeout)
        deadline = time.monotonic() + 15
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        leftovers = _group_members(proc.pid)
        _kill_group(proc.pid)
    return out, err, leftovers


def _group_members(pgid: int) -> List[str]:
    ps = subprocess.run(["ps", "-o", "pid=,stat=,args=", "-g", str(pgid)], capture_output=True, text=True)
    # Zombies are already gone, only not yet reaped by init.
    return [line for line in ps.stdout.splitlines() if line.split()[1:2] != ["Z"]]


def _kill_group(pgid: int) -> bool:
    """SIGKILL whatever is left of the job's process group; True if something was."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def inspect_counters(run: Path, env: Dict[str, str]) -> Dict:
    proc = subprocess.run(["dlearner", "inspect", str(run), "--json"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["metadata"]["counters"]


def iterations(run: Path) -> List[int]:
    from dlearner.reporting import read_metrics

    path = run / "metrics.jsonl"
    return [row["training_iteration"] for row in read_metrics(path)] if path.is_file() else []


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="bash and POSIX signals")
def test_slurm_job_script_trains_resumes_and_stops_cleanly_on_sigterm(tmp_path):
    import time

    run = tmp_path / "run"
    with socket.socket() as busy:  # the dashboard's usual port is taken: the script must print the real one
        busy.bind(("", 0))
        busy.listen()
        busy_port = busy.getsockname()[1]

        # 1. A first job: scheduler, two workers through srun, the driver; trains and checkpoints.
        env = job_environment(tmp_path, busy_port, "--stop-iters 2")
        proc = start_job(env)
        out, err, leftovers = finish_job(proc)
        assert proc.returncode == 0, out + err
        assert not leftovers, leftovers
        printed = re.search(r"Dask dashboard: http://[^:/]+:(\d+)/status", out)
        assert printed, out
        real = re.search(r"dlearner: Dask dashboard http://[^:/]+:(\d+)/status", out)  # what the driver's client saw
        assert real, out
        assert printed.group(1) == real.group(1) != str(busy_port)
        assert "1 env-runner actor" in out and "--resume" not in out
        assert iterations(run) == [1, 2]
        assert inspect_counters(run, env)["iteration"] == 2
        assert not (tmp_path / "dask-scheduler-4242.json").exists()  # cleaned up

        # 2. A follow-up job resumes the run; SIGTERM to the batch shell only (what `sbatch
        #    --signal=B:TERM@120` and `scancel --batch --signal=TERM` send) stops it cleanly.
        env = job_environment(tmp_path, busy_port, "--stop-iters 100000")
        proc = start_job(env)
        try:
            deadline = time.monotonic() + 180
            while len(iterations(run)) < 4:
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "the resumed job did not train"
                time.sleep(0.2)
            os.kill(proc.pid, signal.SIGTERM)
        finally:
            out, err, leftovers = finish_job(proc)
    assert proc.returncode == 0, out + err
    assert not leftovers, leftovers
    assert "resumed" in out and "at iteration 2" in out
    assert "SIGTERM received" in err and "Continue with: dlearner train" in err
    done = iterations(run)
    assert done == list(range(1, done[-1] + 1)) and done[-1] >= 4
    assert inspect_counters(run, env)["iteration"] == done[-1]
