"""``python -m quantport.check check DIR`` / ``inspect DIR``, until the main CLI wires them in."""

from __future__ import annotations

from .commands import main

raise SystemExit(main())
