"""`python -m mergemix`, which is how launchers start it: `accelerate launch -m mergemix propose RECIPE`."""

import sys

from mergemix.cli import main

sys.exit(main())
