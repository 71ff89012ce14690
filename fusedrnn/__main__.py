"""`python -m fusedrnn verify|bench ...`: see fusedrnn.tools.cli."""
import sys

from .tools.cli import main

sys.exit(main())
