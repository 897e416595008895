"""``python -m offramp.cli``: the same as the ``offramp`` command."""

import sys

from offramp.cli import main

sys.exit(main())
