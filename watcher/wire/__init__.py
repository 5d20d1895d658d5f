"""What the daemon and every client share: the protocol, the sockets, the files they read.

Owns the messages (:mod:`.schema`, the one definition of the protocol), sending and
receiving them with bounded queues (:mod:`.transport`), endpoints and CURVE keys
(:mod:`.endpoints`, :mod:`.curve`), globs (:mod:`.globs`), TOML files and the one
converter for config tables (:mod:`.tomlfile`, :mod:`.tables`).

Must never import the daemon or the consumers: both sides import this.
"""
