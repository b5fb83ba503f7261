"""``python -m orm_async_tests``: the same CLI as ``orm-async-tests``."""

import sys

from .cli import main

sys.exit(main())
