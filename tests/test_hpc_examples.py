"""The HPC examples: the dask-jobqueue SLURMCluster's job script and the SLURM batch script (no SLURM needed)."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

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
        queue="gpu", account="proj42", cores=4, memory="16GB", walltime="01:30:00",
        dashboard_address=":0", job_script_prologue=["source ~/venvs/dlearner/bin/activate"],
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
        assert re.search(r"dask_worker .*--nthreads 4", script)
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
    assert "--resources GPU=1" in worker and "--nthreads 1" in worker and "--nworkers 1" in worker
    train = script[script.index("dlearner train"):]
    assert "--scheduler-file" in train and "--checkpoint" in train and "--num-gpus-per-learner 1" in train
