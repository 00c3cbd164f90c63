"""Prometheus exporter for Skillable (Lab on Demand) LatestResults."""

__version__ = "0.1.0"
