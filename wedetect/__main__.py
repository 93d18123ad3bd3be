"""`python -m wedetect ...` runs the CLI (also `torchrun ... -m wedetect train ...`)."""
from .cli import main

main()
