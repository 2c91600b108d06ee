"""``bridgeprobe``: probe where a language model keeps the bridge entity of two-hop questions.

`bridgeprobe run` (no arguments) is the main job: the embedded SmolLM2-135M on the bundled prompt set, writing
a report under reports/. Each subcommand lives in its own module here and registers its parser with
``register(subparsers)``, setting ``handler`` to the function that runs it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from probes.cli import fidelity, identity, lens, memory, patch
from probes.cli.common import EPILOG
from probes.models import ModelLoadError
from probes.results import ResumeMismatch
from prompts.schema import PromptSetError

COMMANDS = (lens, patch, fidelity, memory, identity)
DESCRIPTION = """Probe where a language model keeps the bridge entity of two-hop questions.

`bridgeprobe run` (no arguments) is the main job: the embedded SmolLM2-135M on the bundled prompt set, writing a
report under reports/. `bridgeprobe COMMAND --help` explains each command."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bridgeprobe", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is being loaded")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        args.handler(args)
    except (PromptSetError, ModelLoadError, ResumeMismatch, ValueError) as err:
        if args.verbose:
            raise
        print(f"bridgeprobe: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
