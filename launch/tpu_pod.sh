#!/usr/bin/env bash
# Run the same training command on every worker of a TPU VM pod slice.
#
#   launch/tpu_pod.sh TPU_NAME ZONE [--config=configs/v3_671b.py --workdir=/mnt/shared/run --config.key=value ...]
#
# Each worker runs `python -m launch.train` with the given flags; jax.distributed discovers the
# slice by itself on TPU VMs. The workdir must be a path every worker sees (NFS, or a gcsfuse mount).
# Set REPO_DIR (where the repository is checked out on the workers, default ~/deepseek-jax) and
# SETUP=1 to install the package on the workers first.
set -euo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,10p' "$0"; exit 2
fi
TPU_NAME=$1; ZONE=$2; shift 2
REPO_DIR=${REPO_DIR:-~/deepseek-jax}
ARGS=$(printf '%q ' "$@")
SETUP_CMD=""
if [ "${SETUP:-0}" = 1 ]; then
  SETUP_CMD="pip install -q -e '${REPO_DIR}[tpu]' && "
fi
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all \
  --command="cd ${REPO_DIR} && ${SETUP_CMD}python -m launch.train ${ARGS}"
