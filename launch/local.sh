#!/usr/bin/env bash
# Run the SPMD program on this machine: launch/local.sh [-n RANKS] -- spmd arguments...
set -euo pipefail
# shellcheck source=launch/env.sh
. "$(dirname "$0")/env.sh"
np=2
if [ "${1:-}" = "-n" ]; then np="$2"; shift 2; fi
[ "${1:-}" = "--" ] && shift
exec mpirun -n "$np" python -m mpi4py -m spmd "$@"
