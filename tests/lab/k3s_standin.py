"""The lab's k3s stand-in, run as `python3 -m tests.lab.k3s_standin server|agent|query ...`.

The code lives in the package tests/lab/k3s/ (its __init__ says what it models, and how).
"""

import sys

from tests.lab.k3s.cli import main

if __name__ == "__main__":
    sys.exit(main())
