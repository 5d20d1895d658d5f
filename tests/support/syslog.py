"""Real syslog receivers for the export tests: rsyslog and syslog-ng on loopback.

Each runs in the foreground in a temporary directory on free loopback ports and
writes every message it receives, raw (``%rawmsg%`` / ``$RAWMSG``), one per line,
to a file per input; :func:`parse_rfc5424` reads those lines back.  Both are
stopped (SIGTERM, then SIGKILL) by ``stop()`` / the context manager.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from pathlib import Path
from typing import Self

from support import procs

SYSLOG_NG_ROOT = Path("/opt/pymap-test/syslog-ng")
SD_ID = "pymap@32473"  # the exporter's default SD-ID


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A loopback port free for both TCP and UDP right now."""
    while True:
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        other = socket.SOCK_DGRAM if kind == socket.SOCK_STREAM else socket.SOCK_STREAM
        try:
            with socket.socket(socket.AF_INET, other) as s:
                s.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class Receiver:
    """A syslog server process; subclasses write its config."""

    name = ""

    def __init__(self, tmp: Path):
        self.dir = tmp / self.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None
        self.log = self.dir / "server.log"
        self.tcp_ports: list[int] = []

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def start(self, timeout: float = 20.0) -> Self:
        self._log = open(self.log, "ab")
        self.proc = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT,
                                     env=self.env(), cwd=self.dir)
        deadline = time.monotonic() + timeout
        while not all(_listening(p) for p in self.tcp_ports):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}: "
                                   f"{self.log.read_text(errors='replace')[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not listen on {self.tcp_ports}: "
                                   f"{self.log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.1)
        time.sleep(0.3)  # UDP inputs have no handshake to wait for
        return self

    def stop(self) -> None:
        if self.proc is not None:
            procs.stop(self.proc, 15, self._log)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def lines(self, which: str) -> list[bytes]:
        path = self.dir / f"{which}.log"
        if not path.exists():
            return []
        # Only whole lines: the receiver may be writing the last one as we read.
        complete = path.read_bytes().rpartition(b"\n")[0]
        return [line for line in complete.split(b"\n") if line]


class Rsyslog(Receiver):
    """rsyslogd -n with UDP (imudp), plain TCP (imptcp) and TLS (imtcp + gtls) inputs.

    ``tls``: (ca, cert, key) file paths for the TLS input, or None for no TLS input.
    Messages land in udp.log, tcp.log and tls.log.  The TCP input also parses each
    message's structured data (mmpstrucdata) and writes its event id, as the
    de-duplication key docs/export.md gives for rsyslog reads it, to tcp-id.log.
    """

    name = "rsyslog"

    def __init__(self, tmp: Path, tls: tuple[str, str, str] | None = None):
        super().__init__(tmp)
        self.udp = free_port(socket.SOCK_DGRAM)
        self.tcp = free_port()
        self.tls = free_port() if tls else 0
        self.tcp_ports = [self.tcp] + ([self.tls] if tls else [])
        self.conf = self.dir / "rsyslog.conf"
        self.pidfile = self.dir / "rsyslog.pid"
        (self.dir / "work").mkdir(exist_ok=True)
        extra = {"tcp": f'action(type="mmpstrucdata") action(type="omfile" '
                        f'file="{self.dir / "tcp-id"}.log" template="sd-id" flushOnTXEnd="on" '
                        'asyncWriting="off") '}
        gtls = ""
        tls_input = ""
        if tls:
            ca, cert, key = tls
            gtls = (f'global(DefaultNetstreamDriverCAFile="{ca}" '
                    f'DefaultNetstreamDriverCertFile="{cert}" DefaultNetstreamDriverKeyFile="{key}")\n')
            tls_input = (f'module(load="imtcp" StreamDriver.Name="gtls" StreamDriver.Mode="1" '
                         f'StreamDriver.AuthMode="anon")\n'
                         f'input(type="imtcp" address="127.0.0.1" port="{self.tls}" ruleset="tls")\n')
        self.conf.write_text(
            f'global(workDirectory="{self.dir / "work"}" maxMessageSize="64k")\n'
            + gtls
            + 'template(name="raw" type="string" string="%rawmsg%\\n")\n'
            + f'template(name="sd-id" type="string" string="%$!rfc5424-sd!{SD_ID}!id%\\n")\n'
            + 'module(load="imudp")\nmodule(load="imptcp")\nmodule(load="mmpstrucdata")\n'
            + f'input(type="imudp" address="127.0.0.1" port="{self.udp}" ruleset="udp")\n'
            + f'input(type="imptcp" address="127.0.0.1" port="{self.tcp}" ruleset="tcp")\n'
            + tls_input
            + "".join(f'ruleset(name="{r}") {{ action(type="omfile" file="{self.dir / r}.log" '
                      f'template="raw" flushOnTXEnd="on" asyncWriting="off") {extra.get(r, "")}}}\n'
                      for r in ("udp", "tcp", "tls")))

    def command(self) -> list[str]:
        return ["rsyslogd", "-n", "-f", str(self.conf), "-i", str(self.pidfile)]


class SyslogNG(Receiver):
    """The unpacked syslog-ng (scripts/setup.sh) with one RFC 5424 TCP input (syslog())."""

    name = "syslog-ng"

    def __init__(self, tmp: Path):
        super().__init__(tmp)
        self.tcp = free_port()
        self.tcp_ports = [self.tcp]
        self.conf = self.dir / "syslog-ng.conf"
        self.conf.write_text(
            "@version: 3.38\n"
            "options { keep-hostname(yes); log-msg-size(65536); };\n"
            f'source s_net {{ syslog(transport("tcp") ip("127.0.0.1") port({self.tcp}) '
            'flags(store-raw-message) log-msg-size(65536)); };\n'
            f'destination d_raw {{ file("{self.dir / "tcp.log"}" template("$RAWMSG\\n") '
            "flush-lines(1)); };\n"
            "log { source(s_net); destination(d_raw); };\n")

    @staticmethod
    def available() -> str | None:
        binary = SYSLOG_NG_ROOT / "usr/sbin/syslog-ng"
        return None if binary.exists() else f"{binary} missing (run scripts/setup.sh)"

    def env(self) -> dict[str, str]:
        r = SYSLOG_NG_ROOT
        return {**os.environ, "LD_LIBRARY_PATH":
                f"{r}/usr/lib/x86_64-linux-gnu:{r}/usr/lib/syslog-ng"}

    def command(self) -> list[str]:
        r = SYSLOG_NG_ROOT
        return [f"{r}/usr/sbin/syslog-ng", "-F", f"--module-path={r}/usr/lib/syslog-ng/3.38",
                "-f", str(self.conf), "--persist-file", str(self.dir / "syslog-ng.persist"),
                "--pidfile", str(self.dir / "syslog-ng.pid"),
                "--control", str(self.dir / "syslog-ng.ctl")]


# RFC 5424: <PRI>1 TIMESTAMP HOST APP PROCID MSGID SD MSG
_HEADER = re.compile(rb"^<(\d{1,3})>1 (\S+) (\S+) (\S+) (\S+) (\S+) ")
_SD_ELEMENT = re.compile(rb'\[([^ \]]+)((?: [^ =\]]+="(?:[^"\\]|\\.)*")*)\]')
_SD_PARAM = re.compile(rb' ([^ =\]]+)="((?:[^"\\]|\\.)*)"')


def parse_rfc5424(line: bytes) -> dict:
    """One raw RFC 5424 message as {pri, timestamp, host, app, procid, msgid, sd, msg}.

    ``sd`` maps each SD-ID to its parameters (escapes undone).  Raises ValueError for
    anything that is not RFC 5424.
    """
    m = _HEADER.match(line)
    if not m:
        raise ValueError(f"not RFC 5424: {line[:120]!r}")
    rest = line[m.end():]
    sd: dict[str, dict[str, str]] = {}
    if rest.startswith(b"-"):
        rest = rest[1:]
    else:
        while rest.startswith(b"["):
            e = _SD_ELEMENT.match(rest)
            if not e:
                raise ValueError(f"bad structured data: {rest[:120]!r}")
            params = {k.decode(): re.sub(rb"\\([\"\\\]])", rb"\1", v).decode()
                      for k, v in _SD_PARAM.findall(e.group(2))}
            sd[e.group(1).decode()] = params
            rest = rest[e.end():]
    if rest.startswith(b" "):
        rest = rest[1:]
    if rest.startswith(b"\xef\xbb\xbf"):
        rest = rest[3:]
    pri, ts, host, app, procid, msgid = m.groups()
    return {"pri": int(pri), "timestamp": ts.decode(), "host": host.decode(),
            "app": app.decode(), "procid": procid.decode(), "msgid": msgid.decode(),
            "sd": sd, "msg": rest}
