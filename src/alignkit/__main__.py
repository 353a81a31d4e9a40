"""`python -m alignkit ...` (also what torchrun/accelerate launch can run with -m alignkit)."""

import sys

from alignkit.cli import main

main(sys.argv[1:])
