"""``python -m quantport``: the command line (what ``torchrun -m quantport`` runs on every rank)."""

from .cli import main

raise SystemExit(main())
