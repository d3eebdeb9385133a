"""`python -m celldsl.cli ...` runs the `celldsl` command."""

import sys

from .main import main

sys.exit(main())
