"""Entry point for scheduled refreshes under `ray job submit`: the same options as `ray-render refresh`.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/refresh.py --config jobs/brand_identity/job.yaml --out s3://bucket/brand_identity

Renders only the rows that are new or changed since the last run into that output and marks rows that left the
manifest `removed` (see `ray-render refresh --help`). The cluster/ cron manifests run this every night. It exits
with `ray-render refresh`'s status, except 0 for a refresh that finished with failed or invalid rows (--strict:
fail then too), so a scheduled refresh with one bad row does not fail and start again on new GPU clusters.
"""

from __future__ import annotations

import sys
from pathlib import Path

# The working dir shipped with the job holds the package: prefer it over whatever the cluster has installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ray_render import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli.job_entrypoint("refresh", sys.argv[1:]))
