"""`python -m actstore_cli` runs the `actstore` command."""

import sys

from actstore_cli import main

sys.exit(main())
