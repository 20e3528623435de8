"""Shared setup for the segtransfer test-suite.

The tests exercise the *installed* package (the compiled ``_core`` lives only there); ``reference`` is the
independent NumPy implementation in this directory and ``helpers`` holds small data generators.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # `import reference` / `import helpers` under any import mode
