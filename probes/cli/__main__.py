"""``python -m probes.cli`` runs ``bridgeprobe`` (where the console script is not installed)."""

import sys

from probes.cli import main

sys.exit(main())
