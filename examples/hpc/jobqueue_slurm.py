"""Train PPO with dlearner on SLURM GPU nodes through dask-jobqueue's ``SLURMCluster``.

Run this on a login node (or in a small CPU job); it submits one SLURM job per Dask worker, each with
one GPU, and trains on them::

    pip install dlearner dask-jobqueue
    python examples/hpc/jobqueue_slurm.py --queue gpu --account myproject --jobs 2 --checkpoint runs/ppo

The scheduler runs in this process; workers in the SLURM jobs connect back to it. Each worker
declares the Dask resource ``GPU=1`` (``worker_extra_args``) and each job asks SLURM for one GPU
(``job_extra_directives``), so each learner (``num_gpus_per_learner=1``) gets its own worker and GPU.
Each worker runs one thread (``--nthreads 1``: a learner per process, its torch ops use the job's
cores through ``num_cpus_per_learner``) and starts with the ``python`` found on the compute node's
PATH after the prologue (``--prologue 'source ~/venvs/dlearner/bin/activate'``), not with this
process's interpreter path, which need not exist there. ``make_cluster`` builds the cluster without
submitting anything: ``cluster.job_script()`` shows the batch script each job would run
(``python examples/hpc/jobqueue_slurm.py --print-job-script``). See docs/hpc.md.
"""

from __future__ import annotations

import argparse
from typing import Any, Dict, Optional, Sequence

from dask_jobqueue import SLURMCluster
from distributed import Client

from dlearner import PPOConfig
from dlearner.dashboard import publish_metrics, register_dashboard


def make_cluster(
    *,
    queue: Optional[str] = None,
    account: Optional[str] = None,
    cores: int = 8,
    memory: str = "32GB",
    gpus_per_job: int = 1,
    walltime: str = "02:00:00",
    dashboard_address: str = ":8787",
    job_extra_directives: Sequence[str] = (),
    job_script_prologue: Sequence[str] = (),
    python: str = "python",
    **kwargs: Any,
) -> SLURMCluster:
    """A ``SLURMCluster`` whose jobs each run one single-threaded Dask worker with ``gpus_per_job`` GPUs.

    Nothing is submitted: call ``cluster.scale(jobs=N)`` for that. ``cores`` is what each job asks
    SLURM for (``--cpus-per-task``); the worker still runs one thread. ``job_script_prologue`` lines
    run before the worker starts (``module load ...``, ``source venv/bin/activate``) and ``python`` is
    the interpreter the job starts the worker with, looked up on the compute node's PATH after them
    (dask-jobqueue's default would be this process's absolute path). Extra keyword arguments go to
    ``SLURMCluster`` (e.g. ``interface="ib0"`` for the InfiniBand network).
    """
    if gpus_per_job < 1:
        raise ValueError(f"gpus_per_job must be >= 1, got {gpus_per_job}.")
    if cores < 1:
        raise ValueError(f"cores must be >= 1, got {cores}.")
    return SLURMCluster(
        queue=queue,
        account=account,
        # dask-jobqueue derives the worker's --nthreads from `cores`: 1 thread, one learner per process
        # (as docs/hpc.md says); SLURM still gives the job `cores` CPUs through job_cpu.
        cores=1,
        job_cpu=cores,
        processes=1,  # one worker process per job: one learner per process and GPU
        python=python,
        memory=memory,
        walltime=walltime,
        # SLURM's side: give the job its GPUs (some sites spell it --gpus-per-node or --gpus).
        job_extra_directives=[f"--gres=gpu:{gpus_per_job}", *job_extra_directives],
        # Dask's side: the worker advertises them, so learners that ask for a GPU are placed on it.
        worker_extra_args=["--resources", f"GPU={gpus_per_job}"],
        job_script_prologue=list(job_script_prologue),
        scheduler_options={"dashboard_address": dashboard_address},
        **kwargs,
    )


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queue", default=None, help="SLURM partition with GPUs")
    parser.add_argument("--account", default=None, help="SLURM account to charge")
    parser.add_argument("--jobs", type=int, default=2, help="SLURM jobs = Dask workers = learners (default: 2)")
    parser.add_argument("--cores", type=int, default=8, help="CPU cores per job (default: 8)")
    parser.add_argument("--memory", default="32GB", help="memory per job (default: 32GB)")
    parser.add_argument("--walltime", default="02:00:00", help="time limit per job (default: 02:00:00)")
    parser.add_argument(
        "--prologue",
        action="append",
        default=[],
        metavar="LINE",
        help="shell line run before each worker, e.g. 'source ~/venvs/dlearner/bin/activate'",
    )
    parser.add_argument("--env", default="CartPole-v1", help="gymnasium environment id")
    parser.add_argument("--stop-return", type=float, default=475.0)
    parser.add_argument("--max-iters", type=int, default=200)
    parser.add_argument("--checkpoint", default=None, help="checkpoint directory (shared file system)")
    parser.add_argument("--print-job-script", action="store_true", help="print the job script and exit")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    cluster = make_cluster(
        queue=args.queue,
        account=args.account,
        cores=args.cores,
        memory=args.memory,
        walltime=args.walltime,
        job_script_prologue=args.prologue,
    )
    try:
        if args.print_job_script:
            print(cluster.job_script())
            return {}
        cluster.scale(jobs=args.jobs)
        with Client(cluster) as client:
            print(f"Dask dashboard: {client.dashboard_link}")
            print(f"dlearner page:  {register_dashboard(client)}")
            # Jobs wait in the SLURM queue first: learners can only start once their workers exist.
            client.wait_for_workers(args.jobs)
            config = (
                PPOConfig()
                .environment(args.env)
                .env_runners(num_env_runners=0, num_envs_per_env_runner=8)
                .learners(num_learners=args.jobs, num_gpus_per_learner=1, num_cpus_per_learner=args.cores)
                .cluster(client=client)
            )
            with config.build_algo() as algo:
                if args.checkpoint:
                    try:
                        algo.restore_from_path(args.checkpoint)
                        print(f"resumed {args.checkpoint} at iteration {algo.iteration}")
                    except FileNotFoundError:
                        print(f"new run; checkpoints go to {args.checkpoint}")
                result: Dict[str, Any] = {}
                while algo.iteration < args.max_iters:
                    result = algo.train()
                    publish_metrics(client, "jobqueue-ppo", result)
                    mean_return = result["env_runners"]["episode_return_mean"]
                    print(
                        f"iter {result['training_iteration']:4d}  env steps {result['num_env_steps_sampled_lifetime']:9,}  "
                        f"return {mean_return:7.1f}",
                        flush=True,
                    )
                    if args.checkpoint and result["training_iteration"] % 10 == 0:
                        algo.save_to_path(args.checkpoint)
                    if mean_return >= args.stop_return:
                        break
                if args.checkpoint:
                    algo.save_to_path(args.checkpoint)
                return result
    finally:
        cluster.close()  # cancels the SLURM jobs


if __name__ == "__main__":
    main()
