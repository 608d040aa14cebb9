#!/usr/bin/env bash
# Train PPO with dlearner on a SLURM allocation: one Dask scheduler, one Dask worker per GPU, one driver.
#
#   sbatch examples/hpc/slurm_job.sh                 # submit (edit the #SBATCH lines for your site first)
#   sbatch --dependency=afterany:<jobid> examples/hpc/slurm_job.sh   # a follow-up job resumes the run
#
# Layout: this batch script runs on the allocation's first node. It starts the scheduler there, which
# writes its address to a *scheduler file* on the shared file system; `srun` starts one `dask worker`
# per task (one task per GPU) that finds the scheduler through the same file; the driver
# (`dlearner train --scheduler-file`) attaches to it. Every worker declares the abstract resource
# GPU=1, so each learner asking for a GPU (--num-gpus-per-learner 1) gets a worker, and a GPU, of
# its own. See docs/hpc.md.
#
#SBATCH --job-name=dlearner-ppo
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4          # one Dask worker per GPU
#SBATCH --gres=gpu:4                 # GPUs per node (some sites use --gpus-per-node=4)
#SBATCH --cpus-per-task=8
#SBATCH --mem=0                      # all of each node's memory
#SBATCH --time=02:00:00
#SBATCH --output=dlearner-%j.out
#SBATCH --signal=B:TERM@120          # SIGTERM 2 min before the time limit: time to checkpoint

set -euo pipefail

# ---- settings: edit these --------------------------------------------------------------------------
RUN_DIR="${RUN_DIR:-$SLURM_SUBMIT_DIR/runs/ppo-cartpole}"     # checkpoint, metrics, learning curve
NUM_LEARNERS="${NUM_LEARNERS:-$SLURM_NTASKS}"                 # one learner per worker (= per GPU)
ENV_ID="${ENV_ID:-CartPole-v1}"
# Activate the environment that has dlearner installed, e.g.:
# module load python/3.11 && source "$HOME/venvs/dlearner/bin/activate"

SCHEDULER_FILE="$SLURM_SUBMIT_DIR/dask-scheduler-$SLURM_JOB_ID.json"   # must be on a shared file system
LOCAL_DIR="${TMPDIR:-/tmp}/dask-$SLURM_JOB_ID"                          # node-local scratch for workers

cleanup() {
    # Workers first (they would otherwise try to reconnect), then the scheduler; ignore ones already gone.
    [[ -n "${WORKERS_PID:-}" ]] && kill "$WORKERS_PID" 2>/dev/null || true
    [[ -n "${SCHEDULER_PID:-}" ]] && kill "$SCHEDULER_PID" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -f "$SCHEDULER_FILE"
}
trap cleanup EXIT

# ---- 1. the scheduler, on this (the first) node ------------------------------------------------------
# --preload serves the dlearner page in the dashboard from the start (dlearner train registers it too).
dask scheduler --scheduler-file "$SCHEDULER_FILE" --dashboard-address :8787 \
    --preload dlearner.dashboard &
SCHEDULER_PID=$!
for _ in $(seq 120); do
    [[ -s "$SCHEDULER_FILE" ]] && break
    sleep 1
done
[[ -s "$SCHEDULER_FILE" ]] || { echo "the Dask scheduler did not write $SCHEDULER_FILE within 120 s" >&2; exit 1; }
echo "Dask dashboard: http://$(hostname):8787/status   dlearner page: http://$(hostname):8787/dlearner"
echo "From your laptop: ssh -N -L 8787:$(hostname):8787 <login node>, then open http://localhost:8787/dlearner"

# ---- 2. one worker per task (per GPU) across the allocation ------------------------------------------
# --nworkers 1 --nthreads 1: one process per GPU, one learner per process. --resources GPU=1 is what
# learners with --num-gpus-per-learner 1 are placed by. SLURM sets CUDA_VISIBLE_DEVICES per task
# (with --gpu-bind or gres binding), so each worker sees its own GPU.
srun --ntasks="$SLURM_NTASKS" --cpus-per-task="$SLURM_CPUS_PER_TASK" --gpus-per-task=1 --gpu-bind=single:1 \
    dask worker --scheduler-file "$SCHEDULER_FILE" \
        --resources GPU=1 --nthreads 1 --nworkers 1 \
        --memory-limit 0 --local-directory "$LOCAL_DIR" --death-timeout 120 &
WORKERS_PID=$!

# ---- 3. the driver: train, checkpointing into RUN_DIR --------------------------------------------------
RESUME=()
if [[ -f "$RUN_DIR/zarr.json" ]]; then
    RESUME=(--resume)   # a checkpoint from an earlier job: continue it (counters carry on)
fi
# In the background so this shell can pass SLURM's SIGTERM (time limit, scancel) on to the driver,
# which then saves a checkpoint and exits; the next job continues from it with --resume.
dlearner train --algo PPO --env "$ENV_ID" \
    --num-learners "$NUM_LEARNERS" --num-gpus-per-learner 1 \
    --num-env-runners 0 \
    --stop-return 475 --stop-timesteps 2000000 \
    --checkpoint "$RUN_DIR" --checkpoint-every 5 ${RESUME[@]+"${RESUME[@]}"} \
    --scheduler-file "$SCHEDULER_FILE" &
DRIVER_PID=$!
trap 'kill -TERM "$DRIVER_PID" 2>/dev/null || true' TERM
status=0
wait "$DRIVER_PID" || status=$?
if kill -0 "$DRIVER_PID" 2>/dev/null; then   # the trap interrupted `wait`: let the driver finish saving
    status=0
    wait "$DRIVER_PID" || status=$?
fi
exit "$status"
