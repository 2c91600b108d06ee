"""``bridgeprobe``: probe where a language model keeps the bridge entity of two-hop questions.

`bridgeprobe run` (no arguments) is the main job: the embedded SmolLM2-135M on the bundled prompt set, writing
a report under runs/ (git-ignored; the checked-in examples under reports/ come from reports/rebuild.sh). Each
subcommand lives in its own module here and registers its parser with ``register(subparsers)``, setting
``handler`` to the function that runs it.
"""

from __future__ import annotations

import argparse
import errno
import logging
import shlex
import sys
from typing import NoReturn, Sequence

from bridgeprobe.probes.runs import pipeline
from bridgeprobe.probes.cli import fidelity, finetune, identity, lens, memory, patch
from bridgeprobe.probes.cli.common import EPILOG
from bridgeprobe.probes.model.load import ModelLoadError
from bridgeprobe.probes.io.results import ResumeMismatch
from bridgeprobe.probes.runs.rundir import RunComplete, RunDirError
from bridgeprobe.prompts.schema import PromptSetError

COMMANDS = (lens, patch, fidelity, memory, identity, finetune)
DESCRIPTION = """Probe where a language model keeps the bridge entity of two-hop questions.

`bridgeprobe run` (no arguments) is the main job: logit lens, attribution patching and a shared-memory section on
the embedded SmolLM2-135M and the bundled prompt set, with a report under runs/MODEL/ (git-ignored).
`bridgeprobe COMMAND --help` explains each command."""


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (exit 2), pointing at --help instead of printing the usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="bridgeprobe", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is being loaded")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    pipeline.COMMAND_LINE = shlex.join(["bridgeprobe", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        args.handler(args)
    except RunComplete as done:  # the output directory already holds this run, finished
        print(done)
        return 0
    except KeyboardInterrupt:  # Ctrl-C: every writer keeps what it finished, so the same command resumes
        if args.debug:
            raise
        print("bridgeprobe: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except (PromptSetError, ModelLoadError, ResumeMismatch, RunDirError, ValueError, OSError) as err:
        # user errors (bad option, file or directory; OSError: a file we cannot read or write): one line, exit 2.
        # Anything else is a bug and keeps its traceback (exit 1).
        if args.verbose or args.debug:
            raise
        print(f"bridgeprobe: error: {error_line(err)}", file=sys.stderr)
        return 2
    return 0


def error_line(err: BaseException) -> str:
    """The one-line message of a user error: an OSError names its file and, for a full disk, what to do."""
    if not isinstance(err, OSError):
        return str(err)
    reason = err.strerror or str(err)
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        reason += "; free some space and rerun the same command to resume"
    return f"{err.filename}: {reason}" if err.filename else reason


if __name__ == "__main__":
    sys.exit(main())
