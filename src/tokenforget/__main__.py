"""`python -m tokenforget` runs the command-line tool."""

import sys

from tokenforget.cli import main

sys.exit(main())
