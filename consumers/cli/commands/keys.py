"""``pymap keys``: make and show CURVE key pairs for tcp:// endpoints.

Files are zmq.auth certificates (watcher/wire/curve.py): the daemon needs its
``.key_secret`` (``curve.server_key``) and the clients' ``.key`` files in
``curve.clients``; each client needs its own ``.key_secret`` and the server's
``.key``.  See docs/operations.md#remote-access-curve.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from ..running import EXIT_USAGE, fail

keys_app = typer.Typer(help="Make and show CURVE key pairs for tcp:// endpoints.",
                       no_args_is_help=True)


@keys_app.command("make")
def make(
    name: Annotated[str, typer.Argument(help="Key name: server, or the client's name "
                                        "(it names the client in logs and access rules).")],
    directory: Annotated[str, typer.Option("--dir", "-d", help="Where to write NAME.key and "
                                           "NAME.key_secret.")] = ".",
) -> None:
    """Create NAME.key (public: copy it to the other side) and NAME.key_secret (keep private)."""
    from watcher.wire.curve import CurveError, make_keys

    try:
        public, secret = make_keys(directory, name)
    except CurveError as e:
        fail(str(e), EXIT_USAGE)
    print(f"public key  {public}")
    print(f"secret key  {secret}  (mode 0600: keep it on this host)", flush=True)


@keys_app.command("show")
def show(
    files: Annotated[list[str], typer.Argument(help="Certificate files (.key or .key_secret).")],
    json_: Annotated[bool, typer.Option("--json", help="One JSON object per file.")] = False,
) -> None:
    """Print each certificate's public key (Z85), never the secret one."""
    from watcher.wire.curve import CurveError, load_public, load_secret

    for path in files:
        try:
            try:
                public, _ = load_secret(path)
                kind = "secret"
            except CurveError:
                public, kind = load_public(path), "public"
        except CurveError as e:
            fail(str(e), EXIT_USAGE)
        if json_:
            print(json.dumps({"file": path, "public_key": public.decode(), "has_secret":
                              kind == "secret"}), flush=True)
        else:
            print(f"{public.decode()}  {path} ({kind} certificate)", flush=True)
