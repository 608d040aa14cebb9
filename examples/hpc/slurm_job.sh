#!/usr/bin/env bash
# Train PPO with dlearner on a SLURM allocation: one Dask scheduler, one Dask worker per GPU, one driver.
#
#   sbatch examples/hpc/slurm_job.sh                 # submit (edit the #SBATCH lines for your site first)
#   sbatch --dependency=afterany:<jobid> examples/hpc/slurm_job.sh   # a follow-up job resumes the run
#   scancel --batch --signal=TERM <jobid>            # stop early: the driver saves a checkpoint, then the job ends
#
# Layout: this batch script runs on the allocation's first node. It starts the scheduler there, which
# writes its address to a *scheduler file* on the shared file system; `srun` starts one `dask worker`
# per task (one task per GPU) that finds the scheduler through the same file; the driver
# (`dlearner train --scheduler-file`) attaches to it. Every worker declares the abstract resource
# GPU=1, so each learner asking for a GPU (--num-gpus-per-learner 1) gets a worker, and a GPU, of
# its own. See docs/hpc.md.
#
# Settings can also come from the environment (sbatch exports it by default), e.g.
#   RUN_DIR=$PWD/runs/try2 TRAIN_ARGS="--stop-iters 50 --lr 1e-4" sbatch examples/hpc/slurm_job.sh
#
#SBATCH --job-name=dlearner-ppo
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4          # one Dask worker per GPU
#SBATCH --gres=gpu:4                 # GPUs per node (some sites use --gpus-per-node=4)
#SBATCH --cpus-per-task=8
#SBATCH --mem=0                      # all of each node's memory
#SBATCH --time=02:00:00
#SBATCH --output=dlearner-%j.out
#SBATCH --signal=B:TERM@120          # SIGTERM to this script only, 2 min before the time limit: time to checkpoint

set -euo pipefail

# ---- settings: edit these (or set them in the environment) -------------------------------------------
RUN_DIR="${RUN_DIR:-$SLURM_SUBMIT_DIR/runs/ppo-cartpole}"     # checkpoint, metrics, learning curve
NUM_LEARNERS="${NUM_LEARNERS:-$SLURM_NTASKS}"                 # one learner per worker (= per GPU)
GPUS_PER_LEARNER="${GPUS_PER_LEARNER:-1}"                     # 0 on CPU-only nodes
NUM_ENV_RUNNERS="${NUM_ENV_RUNNERS:-0}"                       # env-runner actors (each needs a worker of its own)
ENV_ID="${ENV_ID:-CartPole-v1}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8787}"                      # the scheduler takes another one if it is in use
SCHEDULER_PORT="${SCHEDULER_PORT:-0}"                         # 0: a free port (another job's scheduler may hold 8786); the scheduler file says which
TRAIN_ARGS="${TRAIN_ARGS:-}"                                  # more `dlearner train` flags, e.g. "--stop-iters 50"
# Activate the environment that has dlearner installed, e.g.:
# module load python/3.11 && source "$HOME/venvs/dlearner/bin/activate"

SCHEDULER_FILE="$SLURM_SUBMIT_DIR/dask-scheduler-$SLURM_JOB_ID.json"   # must be on a shared file system
LOCAL_DIR="${TMPDIR:-/tmp}/dask-$SLURM_JOB_ID"                          # node-local scratch for workers

cleanup() {
    # Workers first, and waited for while their scheduler is still there to see them go (a worker that
    # lost its scheduler retries for seconds before it exits), then the scheduler; ones already gone are fine.
    if [[ -n "${WORKERS_PID:-}" ]]; then
        kill "$WORKERS_PID" 2>/dev/null || true
        wait "$WORKERS_PID" 2>/dev/null || true
    fi
    [[ -n "${SCHEDULER_PID:-}" ]] && kill "$SCHEDULER_PID" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -f "$SCHEDULER_FILE"
}
trap cleanup EXIT
# Until the driver runs, a SIGTERM (scancel, time limit) just ends the job (cleanup runs on exit).
trap 'exit 143' TERM
trap 'exit 130' INT

# ---- 1. the scheduler, on this (the first) node ------------------------------------------------------
# --preload serves the dlearner page in the dashboard from the start (dlearner train registers it too).
dask scheduler --scheduler-file "$SCHEDULER_FILE" --port "$SCHEDULER_PORT" --dashboard-address ":$DASHBOARD_PORT" \
    --preload dlearner.dashboard &
SCHEDULER_PID=$!
# The dashboard's real port is in the scheduler file (another one when DASHBOARD_PORT was taken). The
# file may be half-written when it first appears, so read it until it parses.
PORT=""
for _ in $(seq 240); do
    if PORT=$(python -c 'import json, sys; print(json.load(open(sys.argv[1]))["services"].get("dashboard", ""))' \
            "$SCHEDULER_FILE" 2>/dev/null); then
        break
    fi
    kill -0 "$SCHEDULER_PID" 2>/dev/null || { echo "the Dask scheduler exited; see its messages above" >&2; exit 1; }
    sleep 0.5
done
[[ -s "$SCHEDULER_FILE" ]] || { echo "the Dask scheduler did not write $SCHEDULER_FILE within 120 s" >&2; exit 1; }
if [[ -n "$PORT" ]]; then
    echo "Dask dashboard: http://$(hostname):$PORT/status   dlearner page: http://$(hostname):$PORT/dlearner"
    echo "From your laptop: ssh -N -L $PORT:$(hostname):$PORT <login node>, then open http://localhost:$PORT/dlearner"
else
    echo "The Dask scheduler serves no dashboard (is bokeh installed?)"
fi

# ---- 2. one worker per task (per GPU) across the allocation ------------------------------------------
# --nworkers 1 --nthreads 1: one process per GPU, one learner per process. --resources GPU=1 is what
# learners with --num-gpus-per-learner 1 are placed by. SLURM sets CUDA_VISIBLE_DEVICES per task
# (with --gpu-bind or gres binding), so each worker sees its own GPU.
SRUN_GPUS=() WORKER_GPUS=()
if [[ "$GPUS_PER_LEARNER" != "0" ]]; then
    SRUN_GPUS=(--gpus-per-task=1 --gpu-bind=single:1)
    WORKER_GPUS=(--resources GPU=1)
fi
srun --ntasks="$SLURM_NTASKS" --cpus-per-task="$SLURM_CPUS_PER_TASK" ${SRUN_GPUS[@]+"${SRUN_GPUS[@]}"} \
    dask worker --scheduler-file "$SCHEDULER_FILE" \
        ${WORKER_GPUS[@]+"${WORKER_GPUS[@]}"} --nthreads 1 --nworkers 1 \
        --memory-limit 0 --local-directory "$LOCAL_DIR" --death-timeout 120 &
WORKERS_PID=$!

# ---- 3. the driver: train, checkpointing into RUN_DIR --------------------------------------------------
RESUME=()
if dlearner inspect "$RUN_DIR" >/dev/null 2>&1; then
    RESUME=(--resume)   # a checkpoint from an earlier job: continue it (counters carry on)
fi
# shellcheck disable=SC2206  # TRAIN_ARGS is split into words on purpose
EXTRA=($TRAIN_ARGS)
# In the background so that this shell can pass SIGTERM (sbatch --signal=B:TERM, scancel --batch
# --signal=TERM) on to the driver at once: bash runs a trap only once the foreground command ends, but
# `wait` returns as soon as a trapped signal arrives. The driver then finishes the iteration under way,
# saves a checkpoint and exits 0; the next job continues from it with --resume.
dlearner train --algo PPO --env "$ENV_ID" \
    --num-learners "$NUM_LEARNERS" --num-gpus-per-learner "$GPUS_PER_LEARNER" \
    --num-env-runners "$NUM_ENV_RUNNERS" \
    --stop-return 475 --stop-timesteps 2000000 \
    --checkpoint "$RUN_DIR" --checkpoint-every 5 ${RESUME[@]+"${RESUME[@]}"} \
    --scheduler-file "$SCHEDULER_FILE" ${EXTRA[@]+"${EXTRA[@]}"} &
DRIVER_PID=$!
trap 'kill -TERM "$DRIVER_PID" 2>/dev/null || true' TERM
trap 'kill -INT "$DRIVER_PID" 2>/dev/null || true' INT
# A trap interrupts `wait` (status > 128) while the driver goes on saving: wait again until it has
# exited; bash keeps a finished job's status, so the last `wait` returns the driver's own.
while kill -0 "$DRIVER_PID" 2>/dev/null; do
    wait "$DRIVER_PID" || true
done
status=0
wait "$DRIVER_PID" || status=$?
exit "$status"
