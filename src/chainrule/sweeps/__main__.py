"""`python -m chainrule.sweeps [SWEEP_DIR]`: the same as `chainrule-report`."""

import sys

from chainrule.sweeps.report import main

sys.exit(main())
