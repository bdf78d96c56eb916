"""`python -m moebench`: the command line of this interpreter's moebench (what the workflow
rules run, so they need no activated environment)."""

from moebench.cli import main

main()
