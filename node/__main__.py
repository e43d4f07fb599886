"""`python -m node` runs the `tonle` command line (how local networks start their node processes)."""

import sys

from node.cli import main

sys.exit(main())
