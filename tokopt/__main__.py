"""``python -m tokopt`` = the ``tokopt`` command."""

from tokopt.cli import main

raise SystemExit(main())
