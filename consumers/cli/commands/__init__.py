"""The ``pymap`` commands, one module per job: maps, events, export, daemon, keys.

Each module holds its commands' functions and what only they use; the options
and conventions they share are in consumers/cli/options.py and running.py, and
consumers/cli/app.py assembles them into the typer app.  A command imports what
it needs when it runs, never at import time (start-up: bench/bench_cli.py).
"""
