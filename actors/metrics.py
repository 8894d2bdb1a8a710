"""Metric constants shared by the expert actors and the serving side.

Lives in actors/ because actors/ must not import cluster/ (serving); cluster/metrics.py imports
from here so every latency histogram in the project uses the same buckets (Grafana panels
compare them side by side).
"""

from __future__ import annotations

# Seconds; from 1 ms (one small expert call) to 30 s (a stalled step).
LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
