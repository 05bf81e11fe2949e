"""``python -m twotower`` (and ``torchrun ... -m twotower train ...``): the CLI."""
import sys

from .cli import main

sys.exit(main())
