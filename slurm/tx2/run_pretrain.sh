#!/usr/bin/env bash
# Pre-train on a patch HDF5 data parallel (MPI or Horovod) over the boards of a hostfile: one rank
# per slot (use slots=1 so each TX2 keeps its 8 GB for one training process), each trains on
# batch/NP patches of every step, rank 0 writes OUT_DIR. HOROVOD_* variables are passed on.
#
#   [HOSTFILE=FILE] [NP=N] slurm/tx2/run_pretrain.sh DATA.h5 OUT_DIR [hpcsrl pretrain options]
#
# Settings (HOSTFILE, NP, HPCSRL_IFACE, HPCSRL_BTL, HPCSRL_MPIRUN_ARGS, HPCSRL_VENV) as in
# slurm/tx2/launch.sh. DATA.h5 and OUT_DIR must be valid on every board (a shared folder).
# Exit codes: 2 usage / missing DATA.h5, 3 environment, otherwise the trainer's.
set -euo pipefail
HPCSRL_HOME=${HPCSRL_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
# shellcheck source-path=SCRIPTDIR source=../env.sh  # the checkout's slurm/env.sh
source "$HPCSRL_HOME/slurm/env.sh"
hpcsrl_need_args 2 $# "${BASH_SOURCE[0]}"
[[ -f $1 ]] || hpcsrl_die 2 "DATA.h5 '$1' does not exist"
data=$1
out=$2
shift 2
mkdir -p "$out" || hpcsrl_die 2 "cannot create OUT_DIR '$out'"
hpcsrl_require hpcsrl
exec "$HPCSRL_HOME/slurm/tx2/launch.sh" hpcsrl pretrain --data "$data" --out "$out" "$@"
