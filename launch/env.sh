# Environment for every launch (local, Slurm, Apptainer): MPI, threads, NCCL in one place.
# Source it: `. launch/env.sh`. Values already set by the caller win.
_here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export SPMD_ROOT="${SPMD_ROOT:-$_here}"
export SPMD_VENV="${SPMD_VENV:-$SPMD_ROOT/.venv}"
[ -d "$SPMD_VENV/bin" ] && export PATH="$SPMD_VENV/bin:$PATH"
export PYTHONPATH="$SPMD_ROOT${PYTHONPATH:+:$PYTHONPATH}"
# DeepSpeed's CPU shared-memory comm op, pre-built by `make install`
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$SPMD_VENV/torch-extensions}"
# One OpenMP thread per rank unless told otherwise: ranks already fill the cores
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# Open MPI: containers and CI run as root; small machines run more ranks than cores
if [ "$(id -u)" = 0 ]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
export OMPI_MCA_rmaps_base_oversubscribe="${OMPI_MCA_rmaps_base_oversubscribe:-1}"        # Open MPI 4
export PRTE_MCA_rmaps_default_mapping_policy="${PRTE_MCA_rmaps_default_mapping_policy:-:oversubscribe}"  # 5
# NCCL: never NVLink multicast (NVLS) on shared hosts; debug output level selectable
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"
export TORCH_SYMM_MEM_DISABLE_MULTICAST="${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
unset _here
