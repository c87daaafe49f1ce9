#!/usr/bin/env bash
# The dedicated-orchestrator layout under plain mpirun (slurm/hybrid.sbatch without a heterogeneous job):
#   launch/hybrid.sh HOSTFILE [-- spmd arguments...]
# HOSTFILE in Open MPI's syntax, one `host slots=N` line per host: first the orchestrator's (CPU) host
# with slots=1, then the GPU hosts with slots = their GPUs:
#   cpu01 slots=1
#   gpu01 slots=8
#   gpu02 slots=8
# `mpirun --hostfile HOSTFILE -n <all slots> --map-by slot` puts rank 0 in the first host's one slot
# and ranks 1.. on the GPU hosts in order, and the program runs with --orchestrator dedicated (give
# --group-size etc. after --). Every rank sources launch/env.sh on its own host (ranks started over ssh
# do not get this shell's environment) and runs through launch/rank.sh, so the repository and .venv
# must be at the same path on every host. Inside a Slurm allocation holding the hosts, mpirun starts
# its daemons through Slurm.
set -euo pipefail
# shellcheck source=launch/env.sh
. "$(dirname "$0")/env.sh"
die() { echo "hybrid.sh: $*" >&2; exit 2; }
hosts="${1:-}"
{ [ -n "$hosts" ] && [ "$hosts" != -- ]; } || die "usage: launch/hybrid.sh HOSTFILE [-- spmd arguments...]"
shift
[ "${1:-}" = "--" ] && shift
[ -r "$hosts" ] || die "cannot read the host file $hosts"
# each host line's slots (1 without slots=), comments and blank lines skipped
lines=$(awk '{ sub(/#.*/, "") } NF { n = 1; for (i = 2; i <= NF; i++) if ($i ~ /^slots=[0-9]+$/) n = substr($i, 7)
                                  print $1, n }' "$hosts")
mapfile -t slots < <(awk 'NF { print $2 }' <<<"$lines")
[ "${#slots[@]}" -ge 2 ] || die "$hosts: needs the orchestrator's host and at least one GPU host (${#slots[@]} host line(s))"
[ "${slots[0]}" = 1 ] || die "$hosts: the first host is the orchestrator's and needs slots=1 (it has ${slots[0]})"
np=0
for s in "${slots[@]}"; do np=$((np + s)); done
echo "hybrid.sh: rank 0 (orchestrator) on ${lines%% *}, ranks 1..$((np - 1)) on the other hosts" >&2
# the rank command: bash -c '...' ROOT python ...; $0 is the repository root inside the quoted script
# shellcheck disable=SC2016  # expanded by each rank's shell, not this one
exec "$(command -v mpirun)" --hostfile "$hosts" -n "$np" --map-by slot \
  bash -c '. "$0/launch/env.sh" && exec bash "$0/launch/rank.sh" "$@"' "$SPMD_ROOT" \
  python -m mpi4py -m spmd --orchestrator dedicated "$@"
