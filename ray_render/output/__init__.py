"""What a job leaves under its output root: names, schema, commits, images, and the readers of a finished output."""
