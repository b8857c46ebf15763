"""`python -m cli` runs the `actstore` command."""

import sys

from cli import main

sys.exit(main())
