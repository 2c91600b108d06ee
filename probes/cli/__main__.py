"""``python -m bridgeprobe.probes.cli`` runs ``bridgeprobe`` (where the console script is not installed)."""

import sys

from bridgeprobe.probes.cli import main

sys.exit(main())
