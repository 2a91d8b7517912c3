#!/usr/bin/env bash
# Runs one training command on every host of a TPU VM pod slice; JAX finds its peers through the TPU metadata.
#
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.KEY=VALUE ...]
#
# WORKDIR must be the same shared directory on every host (a Filestore or gcsfuse mount): Orbax writes one
# checkpoint from all hosts, and a preempted slice resumes from it with the same command. Expects the repository
# at ~/diffjax on each host (e.g. `gcloud compute tpus tpu-vm scp --recurse . TPU:~/diffjax --worker=all`).
set -euo pipefail
if [ $# -lt 4 ]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG WORKDIR [--config.KEY=VALUE ...]" >&2
  exit 2
fi
tpu=$1 zone=$2 config=$3 workdir=$4
shift 4
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "
  cd ~/diffjax && python3 -m pip install -q -e '.[tpu]' &&
  python3 -m diffjax.train --multihost --config=$config --workdir=$workdir $*"
