"""``python -m stalk``: the same CLI as the ``stalk`` console script."""

from stalk.cli import main

raise SystemExit(main())
