"""`python -m scratchformer` is the same as the `scratchformer` command."""

from scratchformer.cli import main

raise SystemExit(main())
