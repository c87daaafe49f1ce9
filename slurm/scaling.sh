#!/usr/bin/env bash
# Scaling sweep: one slurm/infer.sbatch job per point, GPU counts within one node (1, 2, 4, ... G),
# then whole nodes (2, 4, ... N), each job after the previous one (--dependency=afterany: one at a time,
# so no two points share a node or the network); then a summary job that re-collects every run's final
# sacct accounting, re-merges, and runs `python -m traces.report --scaling` over all runs.
# From the repository root:
#   slurm/scaling.sh [-N MAX_NODES] [-g GPUS_PER_NODE] [-- more sbatch options, e.g. --partition=gpu]
# The environment carries infer.sbatch's parameters to every job (CHECKPOINT, SIF, DEVICE, ...). Unset
# GROUP_SIZE: each point is one model group over all its ranks (strong scaling of one model); set
# GROUP_SIZE=G: each point holds tasks/G replicas (data-parallel scaling; points below G are skipped).
# DEVICE=cpu sweeps CPU tasks instead of GPUs (for testing). Prints the job ids and where results go:
# RUNS_DIR/spmd-scale-n<nodes>g<gpus>-<job id>/ per point, RUNS_DIR/spmd-scaling-<job id>/ for the summary
# (scaling.txt, scaling.png).
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2; exit 2; }

# Sizes 1, 2, 4, ... below MAX, then MAX itself.
doubling() {
  local n=1
  while [ "$n" -lt "$1" ]; do echo "$n"; n=$((n * 2)); done
  echo "$1"
}

summary() {  # inside the summary job: summary RUN_DIR...
  # shellcheck source=slurm/common.sh
  . "${SPMD_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
  spmd_cd_root
  spmd_setup
  local dir done=()
  for dir in "$@"; do
    if ! compgen -G "$dir/rank*.h5" >/dev/null; then echo "skipped $dir: no traces (job failed?)"; continue; fi
    spmd_sacct "$dir" "${dir##*-}"     # the job has ended: its own line now says COMPLETED/FAILED
    if spmd_python -m traces.merge "$dir" >/dev/null; then done+=("$dir"); else echo "skipped $dir: merge failed"; fi
  done
  [ "${#done[@]}" -gt 0 ] || spmd_die "no run of the sweep left traces"
  spmd_python -m traces.report --scaling "${done[@]}" --out "$RUN_DIR" | tee "$RUN_DIR/scaling.txt"
}

sweep() {
  local max_nodes=1 gpn=4 opts=()
  while [ $# -gt 0 ]; do
    case "$1" in
      -N) max_nodes="$2"; shift 2 ;;
      -g) gpn="$2"; shift 2 ;;
      --) shift; opts=("$@"); break ;;
      *) usage ;;
    esac
  done
  if ! [[ "$max_nodes" =~ ^[1-9][0-9]*$ && "$gpn" =~ ^[1-9][0-9]*$ ]]; then usage; fi
  [ -f slurm/infer.sbatch ] || { echo "error: run from the repository root" >&2; exit 2; }
  local runs="${RUNS_DIR:-runs}" points=() n g ids=() dirs=() id dep=() name gres
  mkdir -p "$runs"
  for g in $(doubling "$gpn"); do points+=("1 $g"); done
  if [ "$max_nodes" -gt 1 ]; then
    for n in $(doubling "$max_nodes"); do [ "$n" -gt 1 ] && points+=("$n $gpn"); done
  fi
  for p in "${points[@]}"; do
    read -r n g <<<"$p"
    if [ -n "${GROUP_SIZE:-}" ] && [ $((n * g % GROUP_SIZE)) != 0 ]; then
      echo "skip $n node(s) x $g: $((n * g)) tasks not a multiple of GROUP_SIZE=$GROUP_SIZE"; continue
    fi
    name="spmd-scale-n${n}g${g}"
    if [ "${DEVICE:-cuda}" = cpu ]; then gres=0; else gres="$g"; fi
    id="$(sbatch --parsable --job-name="$name" --nodes="$n" --ntasks-per-node="$g" --gpus-per-node="$gres" \
      --output="$runs/%x-%j.out" "${dep[@]}" "${opts[@]}" slurm/infer.sbatch)"
    id="${id%%;*}"
    ids+=("$id")
    dirs+=("$runs/$name-$id")
    dep=(--dependency="afterany:$id")
    echo "submitted $name: job $id"
  done
  [ "${#ids[@]}" -gt 0 ] || { echo "error: no point to run" >&2; exit 2; }
  local all
  all="$(IFS=:; echo "${ids[*]}")"
  id="$(sbatch --parsable --job-name=spmd-scaling --nodes=1 --ntasks=1 --gpus-per-node=0 \
    --output="$runs/%x-%j.out" --dependency="afterany:$all" "${opts[@]}" slurm/scaling.sh --summary "${dirs[@]}")"
  id="${id%%;*}"
  echo "submitted summary: job $id (after $all) -> $runs/spmd-scaling-$id/scaling.txt"
}

if [ "${1:-}" = --summary ]; then shift; summary "$@"; else sweep "$@"; fi
