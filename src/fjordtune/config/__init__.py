"""Typed job-file schema, YAML loading and `--set` overrides."""

from fjordtune.config.load import apply_overrides, dump_job, load_job, validate_raw
from fjordtune.config.schema import JobSpec

__all__ = ["JobSpec", "apply_overrides", "dump_job", "load_job", "validate_raw"]
