"""Lets ``python -m meshtrust`` run the command line."""

from meshtrust.cli import main

raise SystemExit(main.main())
