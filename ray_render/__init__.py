"""ray-render: distributed batch rendering of prompt manifests (Parquet, CSV, JSON Lines) with NextStep-1 on Ray.

From Python, `render` does what `ray-render run` does:

    import ray_render

    summary = ray_render.render("prompts.csv", out="out/run1", width=64, height=64, shard_size=100)
    summary.exit_code, summary.rows, summary.images

and `ray_render.data.render(dataset, out=...)` renders a Ray Data dataset (ray_render/data.py). Nothing of the
package is imported here until it is called, so `import ray_render` stays cheap.
"""

__version__ = "0.1.0"


def render(manifests, out: str, **options):
    """Render `manifests` (a path, URL or glob, or a list of them) into `out` and return the run's Summary.

    `options` are the options of `ray-render run` under their Python names (engine/summary.py for the Summary,
    config.JobConfig for the options): `model`, `preset`, `format`, `actors`, `batch_size`, `shard_size`,
    `storage_options` (a dict), `prompt_column`, ... and the render parameters `width`, `height`, `cfg`,
    `num_sampling_steps`, `timesteps_shift`, `num_images`, .... A run ends in its Summary whatever happens
    (`summary.exit_code` as the command's exit status); options that make no job raise config.ConfigError.
    Under Jupyter the progress bar is a notebook bar.
    """
    from ray_render.config import check_option_names, job_from_options
    from ray_render.engine import driver

    check_option_names(options, "ray_render.render")
    return driver.run(job_from_options({**options, "manifests": manifests, "out": out}))
