"""Where the daemon listens by default: one definition for the daemon's config and its
clients (``docs/protocol.md``, Endpoints and sockets)."""

DEFAULT_RUN_DIR = "/run/pymap"
DEFAULT_ENDPOINT = f"ipc://{DEFAULT_RUN_DIR}/pymap.sock"
