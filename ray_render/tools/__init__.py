"""Tools around the renderer: the machine check before a big run, benchmarks and their baselines, fault drills,
the tiny model's evaluation."""
