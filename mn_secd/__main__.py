"""``python -m mn_secd`` is the same as ``mn-secd``."""

import sys

from mn_secd.cli import main

sys.exit(main())
