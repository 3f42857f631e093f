"""ray-render: distributed batch rendering of Parquet prompt manifests with NextStep-1 on Ray."""

__version__ = "0.1.0"
