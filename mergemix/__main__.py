"""`python -m mergemix`, which is how launchers start it: `accelerate launch -m mergemix propose RECIPE`."""

import sys

from mergemix.cli import main

if __name__ == "__main__":  # `mergemix ls` imports every module to fill the registries
    sys.exit(main())
