"""CURVE keys for tcp:// endpoints, in zmq.auth's certificate format.

A key pair is two files made by :func:`zmq.auth.create_certificates`:
``NAME.key`` holds the public key (safe to copy anywhere) and
``NAME.key_secret`` the public and the secret key (keep it private).  The
daemon holds the server's ``.key_secret`` and a directory of allowed clients'
``.key`` files; a client holds its own ``.key_secret`` and the server's
public key (its ``.key`` file, or the 40-character Z85 text).  ``pymap keys``
makes and shows them.  Both sides use this module, so the daemon and every
consumer read keys the same way.
"""

from __future__ import annotations

import os

import attrs
import zmq
import zmq.utils.z85

ZAP_DOMAIN = b"pymap"  # the request socket's
EVENTS_ZAP_DOMAIN = b"pymap-events"  # the event socket's (access rules gate it)
KEY_LENGTH = 40  # a Z85-encoded 32-byte key


class CurveError(ValueError):
    """A key file or key text that cannot be used; the message says which and why."""


def is_tcp(endpoint: str | None) -> bool:
    return bool(endpoint) and endpoint.startswith("tcp://")  # type: ignore[union-attr]


def _load(path: str) -> tuple[bytes, bytes | None]:
    import zmq.auth  # 20 ms: only when keys are used, not at every CLI start

    try:
        public, secret = zmq.auth.load_certificate(path)
    except OSError as e:
        raise CurveError(f"cannot read key file {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise CurveError(f"{path} is not a zmq.auth certificate: {e}") from None
    if public is None or len(public) != KEY_LENGTH:
        raise CurveError(f"{path} holds no CURVE public key")
    return public, secret


def load_secret(path: str) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys from a ``.key_secret`` file."""
    public, secret = _load(path)
    if secret is None or len(secret) != KEY_LENGTH:
        raise CurveError(f"{path} holds no secret key (give the .key_secret file)")
    return public, secret


def load_public(text_or_path: str) -> bytes:
    """A public key: 40 characters of Z85 text, or a certificate file holding one."""
    if len(text_or_path) == KEY_LENGTH and not os.path.exists(text_or_path):
        key = text_or_path.encode()
        try:
            zmq.utils.z85.decode(key)
        except (ValueError, KeyError):
            raise CurveError(f"{text_or_path!r} is not a Z85 CURVE key") from None
        return key
    return _load(text_or_path)[0]


def load_allowed(directory: str) -> dict[bytes, str]:
    """Allowed clients: public key -> name (the file's stem) for each ``*.key`` file."""
    try:
        names = sorted(n for n in os.listdir(directory) if n.endswith(".key"))
    except OSError as e:
        raise CurveError(f"cannot read client keys directory {directory}: "
                         f"{e.strerror or e}") from None
    allowed: dict[bytes, str] = {}
    for name in names:
        allowed[_load(os.path.join(directory, name))[0]] = name[:-len(".key")]
    return allowed


def make_keys(directory: str, name: str) -> tuple[str, str]:
    """Create ``NAME.key`` and ``NAME.key_secret`` in ``directory`` (0700 if created)."""
    if not name or "/" in name or name.startswith("."):
        raise CurveError(f"{name!r} is not a key name (letters, digits, - and _)")
    os.makedirs(directory, mode=0o700, exist_ok=True)
    public = os.path.join(directory, f"{name}.key")
    if os.path.exists(public) or os.path.exists(public + "_secret"):
        raise CurveError(f"{public} already exists; remove it or pick another name")
    import zmq.auth

    old = os.umask(0o077)  # the secret file is born private
    try:
        public, secret = zmq.auth.create_certificates(directory, name)
    finally:
        os.umask(old)
    os.chmod(public, 0o644)
    return public, secret


@attrs.frozen
class ServerKeys:
    public: bytes
    secret: bytes

    def apply(self, sock: zmq.Socket, domain: bytes = ZAP_DOMAIN) -> None:
        """Make ``sock`` a CURVE server; the ZAP handler decides who may connect."""
        sock.curve_server = True
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret
        sock.zap_domain = domain


@attrs.frozen
class ClientKeys:
    server_public: bytes
    public: bytes
    secret: bytes

    @classmethod
    def load(cls, server_key: str, client_cert: str) -> ClientKeys:
        public, secret = load_secret(client_cert)
        return cls(load_public(server_key), public, secret)

    def apply(self, sock: zmq.Socket) -> None:
        sock.curve_serverkey = self.server_public
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret
