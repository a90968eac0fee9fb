"""`python -m tau2cl` is the `tau2cl` command."""

import sys

from tau2cl.cli import main

if __name__ == "__main__":
    sys.exit(main())
