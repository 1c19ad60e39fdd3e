"""`python -m fjordtune` = the `fjordtune` command (what `ray job submit` entrypoints call)."""

import sys

from fjordtune.cli import main

sys.exit(main())
