"""`python -m jaxdream.cli ...` runs the `jaxdream` command."""

import sys

from jaxdream.cli.main import main

sys.exit(main())
