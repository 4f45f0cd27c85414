"""``python -m dume.coordinator``: the same as the ``dume-coordinator`` command."""

import sys

from dume.coordinator.cli import main

sys.exit(main())
