# shellcheck shell=bash
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
# Never NVLink multicast (NVLS), whatever the caller set: on hosts whose GPUs are shared it can put
# them out of service; NCCL, PyTorch's symmetric memory and NVSHMEM each have their own switch.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# NCCL's log level: WARN by default; launch/rank.sh raises it to INFO into the run's logs/ so the
# transports (P2P, SHM, NET/IB, NET/Socket) can be read back (traces/nccl_log.py, slurm/check_transport.py)
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
# Which network interface the TCP side uses: NCCL's bootstrap and Socket transport, and gloo (CPU runs,
# torch's store). Unset, both pick one themselves (NCCL skips lo and docker*); on nodes with several
# networks set SPMD_IFNAME=ib0 (or eth0, ...) once for both, or NCCL_SOCKET_IFNAME/GLOO_SOCKET_IFNAME apart.
if [ -n "${SPMD_IFNAME:-}" ]; then
  export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-$SPMD_IFNAME}" GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-$SPMD_IFNAME}"
fi
# InfiniBand: NCCL finds the HCAs itself. NCCL_IB_HCA (e.g. mlx5_0,mlx5_1), NCCL_IB_GID_INDEX (RoCE),
# NCCL_NET_GDR_LEVEL, NCCL_IB_TIMEOUT are the site's to set (module or job script); nothing is set here,
# so a site's values pass through unchanged.
# Timeouts: a failed or timed-out NCCL collective tears the process group down and ends the process
# (torch's watchdog, after init_process_group's timeout), so srun/mpirun end the job instead of
# leaving an allocation hanging in a collective.
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
# CUDA: number GPUs in PCI bus order, as nvidia-smi and Slurm do, so local rank r is the GPU Slurm lists r-th
export CUDA_DEVICE_ORDER="${CUDA_DEVICE_ORDER:-PCI_BUS_ID}"
export TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
unset _here
