"""Tools around the renderer: benchmarks and their baselines, fault drills, the tiny model's evaluation."""
