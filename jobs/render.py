"""Entry point for `ray job submit`: the same options as `ray-render run` (or --config FILE), run in the cluster.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/render.py --config jobs/examples/render.yaml

Inside a job Ray sets RAY_ADDRESS, so the driver joins that cluster (the default of --address) instead of starting
its own. The process exits with `ray-render run`'s status (see `ray-render run --help`), so a failed job shows as
FAILED, except that a job that finished with some failed or invalid rows exits 0 (they are in the metadata; one bad
row in a million must not send an orchestrator to new GPU clusters); pass --strict to make that fail too.
"""

from __future__ import annotations

import sys
from pathlib import Path

# The working dir shipped with the job holds the package: prefer it over whatever the cluster has installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ray_render import cli  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return cli.job_entrypoint("run", sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
