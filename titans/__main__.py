"""`python -m titans ...`: the same as the `titans` command."""

from .cli import main

raise SystemExit(main())
