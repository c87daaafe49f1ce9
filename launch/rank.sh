#!/usr/bin/env bash
# Per-rank wrapper: mpirun -n N launch/rank.sh python -m mpi4py -m spmd ... --trace-dir DIR
# (srun launch/rank.sh ... works the same). Besides spmd/runtime/world.py, the one place that reads the
# launcher's rank variables (OMPI_COMM_WORLD_RANK, PMIX_RANK, SLURM_PROCID).
#
#   PROFILE=none|perf|torch|nsys  what wraps or drives each rank (default none)
#   PROFILE_DIR=DIR               where the rank-tagged files go (default: the program's --trace-dir)
#   PERF_EVENTS=a,b,...           perf stat events (default: software events, + cycles,instructions
#                                 when `perf stat` can read hardware counters here)
#   PERF_RECORD=1                 also `perf record -g` on CLOCK_MONOTONIC, then `perf script`
#   NSYS_ARGS="..."               extra `nsys profile` options
#   NCCL_LOG=0                    leave NCCL_DEBUG alone (default: INFO into logs/rankNNNNN.nccl.log)
#
# Files under DIR, NNNNN = 5-digit rank:
#   logs/rankNNNNN.log         stdout + stderr of the rank (also still on the console)
#   logs/rankNNNNN.nccl.log    NCCL_DEBUG=INFO output (transports: P2P, SHM, NET/IB, NET/Socket)
#   perf/rankNNNNN.stat.csv    perf stat -x,        perf/rankNNNNN.data, .script.txt (PERF_RECORD=1)
#   nsys/rankNNNNN.nsys-rep    window = cudaProfilerStart/Stop; .sqlite if `nsys export` works here
#   torch/rankNNNNN.json       written by the program (--profile torch)
# PROFILE=torch|nsys appends `--profile torch|nsys` to the command unless it already has --profile.
set -uo pipefail

rank=${OMPI_COMM_WORLD_RANK:-${PMIX_RANK:-${SLURM_PROCID:-}}}
if [ -z "$rank" ]; then
  echo "rank.sh: no rank variable (OMPI_COMM_WORLD_RANK, PMIX_RANK or SLURM_PROCID); run under mpirun/srun" >&2
  exit 2
fi
tag=rank$(printf %05d "$rank")
profile=${PROFILE:-none}
case "$profile" in none|perf|torch|nsys) ;;
  *) echo "rank.sh: PROFILE=$profile: expected none, perf, torch or nsys" >&2; exit 2;;
esac
[ $# -gt 0 ] || { echo "rank.sh: no command to run" >&2; exit 2; }

dir=${PROFILE_DIR:-}
if [ -z "$dir" ]; then  # the program's --trace-dir
  prev=""
  for a in "$@"; do
    case "$a" in --trace-dir=*) dir=${a#--trace-dir=};; esac
    [ "$prev" = "--trace-dir" ] && dir=$a
    prev=$a
  done
fi
if [ "$profile" != none ] && [ -z "$dir" ]; then
  echo "rank.sh: PROFILE=$profile needs PROFILE_DIR or --trace-dir" >&2
  exit 2
fi

cmd=("$@")
if [ "$profile" = torch ] || [ "$profile" = nsys ]; then
  has=0
  for a in "$@"; do case "$a" in --profile|--profile=*) has=1;; esac; done
  [ $has = 1 ] || cmd+=(--profile "$profile")
fi

if [ -n "$dir" ]; then
  mkdir -p "$dir/logs"
  if [ "${NCCL_LOG:-1}" = 1 ] && [ -z "${NCCL_DEBUG_FILE:-}" ]; then
    case "${NCCL_DEBUG:-}" in INFO|TRACE) ;; *) export NCCL_DEBUG=INFO;; esac
    export NCCL_DEBUG_FILE="$dir/logs/$tag.nccl.log"
  fi
fi

pre=()
case "$profile" in
  perf)
    command -v perf >/dev/null || { echo "rank.sh: PROFILE=perf but no perf here (make install-perf)" >&2; exit 2; }
    mkdir -p "$dir/perf"
    events=${PERF_EVENTS:-task-clock,context-switches,cpu-migrations,page-faults}
    if [ -z "${PERF_EVENTS:-}" ] && perf stat -x, -e cycles,instructions true 2>&1 >/dev/null | grep -q '^[0-9]'; then
      events="$events,cycles,instructions"
    fi
    # shellcheck disable=SC2054  # the commas are perf's field separator, not array syntax
    pre=(perf stat -x, -o "$dir/perf/$tag.stat.csv" -e "$events" --)
    if [ "${PERF_RECORD:-0}" = 1 ]; then
      pre=(perf record -q -g -k CLOCK_MONOTONIC -F "${PERF_FREQ:-199}" -o "$dir/perf/$tag.data" -- "${pre[@]}")
    fi
    ;;
  nsys)
    command -v nsys >/dev/null || { echo "rank.sh: PROFILE=nsys but no nsys here: use PROFILE=torch" >&2; exit 2; }
    mkdir -p "$dir/nsys"
    # shellcheck disable=SC2206,SC2054  # NSYS_ARGS is a list of options; --trace=cuda,nvtx is one option
    pre=(nsys profile --capture-range=cudaProfilerApi --capture-range-end=stop --trace=cuda,nvtx
         --force-overwrite=true -o "$dir/nsys/$tag" ${NSYS_ARGS:-} --)
    ;;
esac

if [ -z "$dir" ]; then
  exec "${pre[@]}" "${cmd[@]}"
fi

# Tee stdout and stderr into the rank's log; the program runs as a child so the tees can drain after it.
# The tees ignore TERM, INT and HUP (an ignored signal stays ignored across exec): Slurm's --signal
# reaches every process of the task, and a tee that died would break the program's output mid-run
# (EPIPE) instead of letting it stop cleanly; they end when the program closes its side.
log="$dir/logs/$tag.log"
: > "$log"
exec {out}> >(trap '' TERM INT HUP; exec tee -a "$log"); tee_out=$!
exec {err}> >(trap '' TERM INT HUP; exec tee -a "$log" >&2); tee_err=$!
"${pre[@]}" "${cmd[@]}" <&0 >&"$out" 2>&"$err" &
child=$!
# Under mpirun, forward a TERM/INT/HUP of this wrapper to the program as TERM (mpirun signals the process
# it started; under Slurm's --signal the program gets it directly too: spmd.runtime.stop takes the two
# as one). Under srun, whose signals reach every process of the task, ignore them instead: a `wait` that
# a trapped signal interrupts returns 128 + its number, and when the program had ended meanwhile its own
# code was lost (srun's --kill-on-bad-exit TERM reaching a rank already exiting 2: the task's code 143,
# seen in CI) or, with bash 5.2, `wait` hung. Untrapped, `wait` returns the program's code.
if [ -n "${OMPI_COMM_WORLD_RANK:-}" ]; then
  trap 'kill -TERM "$child" 2>/dev/null' TERM INT HUP
else
  trap '' TERM INT HUP
fi
rc=0
wait "$child" || rc=$?
while kill -0 "$child" 2>/dev/null; do wait "$child" || rc=$?; done  # wait again after a trapped signal

if [ "$profile" = perf ] && [ -f "$dir/perf/$tag.data" ]; then
  perf script -i "$dir/perf/$tag.data" -F comm,tid,time,event,period,ip,sym --ns -G \
    > "$dir/perf/$tag.script.txt" 2>>"$log" || echo "rank.sh: perf script failed (see $log)" >&"$err"
fi
if [ "$profile" = nsys ] && [ -f "$dir/nsys/$tag.nsys-rep" ]; then
  nsys export --type sqlite --force-overwrite true -o "$dir/nsys/$tag.sqlite" "$dir/nsys/$tag.nsys-rep" \
    >>"$log" 2>&1 || echo "rank.sh: nsys export failed; copy $dir/nsys/$tag.nsys-rep elsewhere" >&"$err"
fi
exec {out}>&- {err}>&-
for p in $tee_out $tee_err; do
  while kill -0 "$p" 2>/dev/null; do sleep 0.05; done
done
exit "$rc"
