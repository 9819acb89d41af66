"""``python -m model_store {list,verify} STORE``."""

from model_store.cli import main

raise SystemExit(main())
