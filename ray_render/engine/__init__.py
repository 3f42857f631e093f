"""The run lifecycle: planning, rows, the actor pool, shard rendering, and the drivers of `run` and `refresh`."""
