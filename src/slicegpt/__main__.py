"""`python -m slicegpt ...` is the `slicegpt` command."""

import sys

from .cli import main

sys.exit(main())
