"""``python -m segtransfer``: the same command line as the ``segtransfer`` console script."""

from segtransfer._cli import main

raise SystemExit(main())
