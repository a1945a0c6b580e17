"""First contact with a Flower 1.41 SuperLink, bounded as a whole by one timeout.

A SuperLink serves its Fleet API as protobuf over HTTP(S) (uvicorn), so the check is the
one the SuperNode's own client (``httpx``) makes: a TCP connection, the TLS handshake with
the same trust settings (the given CA file, else httpx's default CAs; the host name checked
against the certificate) and one HTTP request, each step limited by what is left of the
deadline. Any HTTP answer (a 404 for ``GET /``) proves that a server speaking the right
protocol is there. A refused or unresolvable address is retried until the deadline (the
server may still be starting); a listener that accepts and then stays silent fails when
the time is up; a certificate the CA does not vouch for, or a server speaking another
protocol, fails at once. Each failure is one line naming the address and the fix.
"""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path

from medfed.common.errors import MedfedError

RETRY_S = 1.0
_HTTP = b"HTTP/"


class _NoAnswer(Exception):
    """The listener accepted the connection, then did not answer as a Flower server (``timed_out``: in time)."""

    def __init__(self, what: str, timed_out: bool) -> None:
        super().__init__(what)
        self.timed_out = timed_out


def wait_for_server(
    address: str,
    host: str,
    port: int,
    *,
    timeout: float,
    tls: bool = True,
    root_cert: str | Path | None = None,
    timeout_hint: str = "--connect-timeout",
) -> None:
    """Return once the server at ``host:port`` answers HTTP(S) within ``timeout`` seconds in all.

    ``address`` is how the user wrote it (named in errors); ``root_cert`` the CA file for TLS
    (None: the default CAs); ``timeout_hint`` names the setting that raises the bound.
    """
    deadline = time.monotonic() + max(0.0, timeout)
    mode = "TLS" if tls else "plain HTTP (--insecure)"
    context = _tls_context(root_cert) if tls else None
    last = "no attempt"
    while True:
        try:
            _probe(host, port, context, deadline)
            return
        except _NoAnswer as exc:
            bound = f" within {timeout:g} s in all" if exc.timed_out else ""
            raise MedfedError(
                f"the server at {address} accepted the connection but {exc}{bound}: check that {address} "
                f"is the SuperLink's address and port and that it serves {mode}, or raise {timeout_hint}"
            ) from None
        except ssl.SSLCertVerificationError as exc:
            raise MedfedError(
                f"the server at {address} presented a certificate that was refused ({exc.verify_message}): "
                f"set root-cert to the server operator's ca.crt, and have its server.crt name {host} "
                f"(`medfed certs server --host {host}`)"
            ) from None
        except ssl.SSLError as exc:
            raise MedfedError(
                f"the TLS handshake with the server at {address} failed ({exc.reason or exc}): "
                "if the server was started with --insecure, use --insecure here too (tests only), "
                "else check the address and port"
            ) from None
        except (OSError, ValueError) as exc:  # refused, unreachable, no such host: the server may be starting
            if not isinstance(exc, _Deadline):
                last = "timed out" if isinstance(exc, TimeoutError) else (getattr(exc, "strerror", None) or str(exc))
        left = deadline - time.monotonic()
        if left <= 0:
            raise MedfedError(
                f"cannot reach the server at {address} ({last}; gave up after {timeout:g} s): start it "
                f"with `medfed server start`, check the address (site.yaml server or --server) and the "
                f"network, or raise {timeout_hint}"
            )
        time.sleep(min(RETRY_S, left))


def _tls_context(root_cert: str | Path | None) -> ssl.SSLContext:
    """What Flower's client trusts: the CA file (as httpx does for a path), else httpx's default CAs."""
    if root_cert:
        return ssl.create_default_context(cafile=str(root_cert))
    import httpx

    return httpx.create_ssl_context(verify=True)


class _Deadline(TimeoutError):
    """The time given for the whole first contact is spent."""


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise _Deadline("timed out")
    return left


def _probe(host: str, port: int, context: ssl.SSLContext | None, deadline: float) -> None:
    """One connection: TCP, TLS (when ``context``), ``GET /``; raise unless an HTTP answer comes back."""
    sock = socket.create_connection((host, port), timeout=_left(deadline))
    stage = "complete the TLS handshake" if context is not None else "answer an HTTP request"
    try:
        try:
            if context is not None:
                sock.settimeout(_left(deadline))
                sock = context.wrap_socket(sock, server_hostname=host)
                stage = "answer an HTTP request over TLS"
            sock.settimeout(_left(deadline))
            name = f"[{host}]" if ":" in host else host
            sock.sendall(f"GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode("ascii"))
            answer = b""
            while len(answer) < len(_HTTP):
                sock.settimeout(_left(deadline))
                chunk = sock.recv(len(_HTTP) - len(answer))
                if not chunk:
                    break
                answer += chunk
        except TimeoutError:
            raise _NoAnswer(f"did not {stage}", timed_out=True) from None
        except (ConnectionResetError, BrokenPipeError, ssl.SSLEOFError):
            raise _NoAnswer(f"closed it when asked to {stage}{_plain_hint(context)}", timed_out=False) from None
        if not answer.startswith(_HTTP):
            raise _NoAnswer(f"did not answer as an HTTP server{_plain_hint(context)}", timed_out=False)
    finally:
        sock.close()


def _plain_hint(context: ssl.SSLContext | None) -> str:
    return "" if context is not None else " (a TLS server does that to plain HTTP: drop --insecure)"
