"""`python -m cpcbm_blocks` runs the `cpcbm-blocks` command line."""

import sys

from cpcbm_blocks.cli import main

sys.exit(main())
