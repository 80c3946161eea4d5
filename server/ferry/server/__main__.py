from __future__ import annotations

import sys

from ferry.server.cli import main

sys.exit(main())
