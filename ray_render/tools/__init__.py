"""Commands that help run ray-render rather than render: `doctor` checks a machine before a big run."""
