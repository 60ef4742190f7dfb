"""``python -m bridge`` runs the same CLI as ``task-bridge``."""

from bridge.cli import main

raise SystemExit(main())
