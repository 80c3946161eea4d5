"""``python -m ferry.cli``: the same as the ``ferry`` command."""

from __future__ import annotations

import sys

from ferry.cli import main

sys.exit(main())
