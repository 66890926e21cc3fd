#!/usr/bin/env bash
# The stack's one-shot set-up (the `init` service of infra/compose.yaml), safe to run again:
# 1. the buckets (MLflow's artifacts; sources and corpora);
# 2. the S3 credentials file the stage containers read (AWS_SHARED_CREDENTIALS_FILE), in the
#    secrets volume, readable by the fusellm user only: secrets never go into Prefect;
# 3. the work pools fusellm-cpu and fusellm-gpu (`fusellm pools`: images, network, volumes,
#    environment of the stage containers; the GPU pool's concurrency limit);
# 4. the deployments of infra/prefect.yaml.
set -euo pipefail
cd "$FUSELLM_PROJECT_DIR"

python - <<'PY'
import os

import boto3

s3 = boto3.client(
    "s3",
    endpoint_url=os.environ["S3_URL"],
    aws_access_key_id=os.environ["S3_ACCESS_KEY"],
    aws_secret_access_key=os.environ["S3_SECRET_KEY"],
    region_name="us-east-1",
)
have = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
for bucket in filter(None, os.environ["BUCKETS"].split(",")):
    if bucket not in have:
        s3.create_bucket(Bucket=bucket)
    print(f"bucket {bucket}: ready")
PY

secrets=$(dirname "$AWS_SHARED_CREDENTIALS_FILE")
umask 077
printf '[default]\naws_access_key_id = %s\naws_secret_access_key = %s\nregion = us-east-1\n' \
  "$S3_ACCESS_KEY" "$S3_SECRET_KEY" > "$AWS_SHARED_CREDENTIALS_FILE.tmp"
mv "$AWS_SHARED_CREDENTIALS_FILE.tmp" "$AWS_SHARED_CREDENTIALS_FILE"
chown 10001 "$secrets" "$AWS_SHARED_CREDENTIALS_FILE" "$FUSELLM_HOME"  # what's inside is 10001's
echo "credentials file for the stage containers: $AWS_SHARED_CREDENTIALS_FILE"
unset S3_ACCESS_KEY S3_SECRET_KEY

fusellm pools --type docker --gpu-concurrency "${GPU_CONCURRENCY:-1}"
prefect --no-prompt deploy --prefect-file infra/prefect.yaml --all
echo "stack ready"
