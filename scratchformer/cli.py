"""The `scratchformer` command line."""

import sys


def main(argv=None) -> int:
    print("scratchformer: commands arrive with the engine", file=sys.stderr)
    return 0
