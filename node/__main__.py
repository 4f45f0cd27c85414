"""``python -m dume.node``: the same as the ``dume-node`` command."""

import sys

from dume.node.cli import main

sys.exit(main())
