import os

# Worker processes log every pause and loss that the memory scenarios provoke on
# purpose; they read this at import, so it is set before distributed is imported here
# (the harness quiets this process's own loggers itself).
os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "error")

from bench.cli import main

raise SystemExit(main())
