"""`python -m gnlorp`: the command line (gnlorp/cli)."""

from gnlorp.cli.main import main

raise SystemExit(main())
