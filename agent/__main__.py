"""`python3 -m agent`: the same entry point as the `sugarkube-agent` console script."""

import sys

from agent.cli import main

sys.exit(main())
