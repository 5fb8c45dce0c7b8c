"""`python -m qtrain ...` (and `torchrun ... -m qtrain train RECIPE`): the same as the `qtrain` command."""

import sys

from qtrain.cli.main import main

sys.exit(main())
