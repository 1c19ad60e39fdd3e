"""Telemetry: NVML GPU sampling and Ray metrics."""
