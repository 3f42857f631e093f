"""Manifests from templates: prompt grids for dataset synthesis."""
