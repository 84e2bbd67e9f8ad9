"""`python3 -m <this package> server|agent|query ...` (the lab: `-m tests.lab.k3s_standin`)."""

import sys

from .cli import main

sys.exit(main())
