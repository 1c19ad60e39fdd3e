"""`python -m fjordtune` = the `fjordtune` command (what `ray job submit` entrypoints call)."""

from fjordtune.cli import entry

entry()
