"""`python -m fusedrnn verify|bench ...`: see fusedrnn.cli."""
import sys

from .cli import main

sys.exit(main())
