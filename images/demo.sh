#!/usr/bin/env bash
# The demo inside the CPU image (images/Dockerfile.cpu): what scripts/demo does, without the install.
# Starts SeaweedFS (S3) and a Ray head with token auth on 127.0.0.1, submits
# `python -m fjordtune run jobs/demo.yaml` with `ray job submit`, prints the base-vs-tuned table.
#   docker run --rm --shm-size=2g fjordtune:0.1.0-ray2.60.0-py311-cpu
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# The stack's state (S3 data, the generated S3 keys and Ray token) lives outside the folder that
# `ray job submit --working-dir .` uploads to the cluster.
STATE=/tmp/fjordtune-demo/devstack
ENV_FILE=/tmp/fjordtune-demo/devstack.env
OUT="$PWD/outputs/demo"

python -m fjordtune validate jobs/demo.yaml
mkdir -p -m 700 /tmp/fjordtune-demo
python -m fjordtune.devstack up --state-dir "$STATE" --bucket fjordtune-demo --env-file "$ENV_FILE"
trap 'python -m fjordtune.devstack down --state-dir "$STATE" >/dev/null 2>&1 || true' EXIT
# shellcheck disable=SC1090
source "$ENV_FILE"   # RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH, RAY_API_SERVER_ADDRESS, AWS_*

ray job submit --address "$RAY_API_SERVER_ADDRESS" --working-dir . \
  -- python -m fjordtune run jobs/demo.yaml --output-dir "$OUT"
echo
sed -n '/^| task /,/^| \*\*average/p' "$OUT/report.md"
echo "report: $OUT/report.md"
