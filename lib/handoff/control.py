"""Control channel between an engine and its paired trainer: one Unix domain socket.

Each message is a JSON object plus an optional binary blob (start-up handles), framed by two
lengths. A Unix socket costs microseconds per message, where a gloo round trip costs milliseconds,
and the kernel closes it when a process dies, so a dead peer shows up as end-of-file at once.
"""
from __future__ import annotations

import json
import os
import select
import signal
import socket
import stat
import struct
import time
from typing import Optional

# sun_path holds 108 bytes on Linux; keep a margin for the terminating NUL and odd platforms.
MAX_ADDRESS_BYTES = 100
_FRAME = struct.Struct("!II")  # JSON length, blob length
_CONNECT_RETRY_S = 0.02


class PeerError(RuntimeError):
    """The peer died, stopped answering within the timeout, or reported a failure."""


class HandoffClosed(PeerError):
    """The peer ended the handoff in order (no more steps will come)."""


class PeerSilent(PeerError):
    """The peer is alive (its socket is open) but sent nothing within the timeout: stopped or hung."""

    def __init__(self, message: str, peer_pid: Optional[int]):
        super().__init__(message)
        self.peer_pid = peer_pid


def silent_peer_pid(exc: BaseException) -> Optional[int]:
    """The pid of the peer a PeerSilent anywhere in exc's cause chain names (None: no such error, or a
    platform that does not say)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, PeerSilent):
            return exc.peer_pid if exc.peer_pid and exc.peer_pid != os.getpid() else None
        exc = exc.__cause__ or exc.__context__
    return None


def end_silent_peer(exc: BaseException) -> Optional[int]:
    """SIGKILL the peer a fatal PeerSilent names (silent_peer_pid); returns its pid, or None.

    A rank that fails on a silent peer ends the job; torchrun then SIGTERMs every rank, but a stopped or
    hung process cannot act on SIGTERM, and torchrun waits a fixed 30 s before its SIGKILL. Ending the
    peer here makes the job end within the loop timeout. Only for a failure that ends this rank: a
    silence that is caught (waiting for a peer to close at the end of a run) never gets here."""
    pid = silent_peer_pid(exc)
    if pid is None:
        return None
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return None
    return pid


def _peer_pid(sock: socket.socket) -> Optional[int]:
    """The connected process's pid (SO_PEERCRED, Linux); None where the platform does not say."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return None
    try:
        pid, _, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i")))
    except OSError:
        return None
    return pid or None


def check_address(address: str) -> None:
    encoded = os.fsencode(address)
    if not address or len(encoded) >= MAX_ADDRESS_BYTES:
        raise ValueError(
            f"handoff address {address!r} is {len(encoded)} bytes; a Unix socket path must be 1.."
            f"{MAX_ADDRESS_BYTES - 1} bytes: choose a shorter path (e.g. under /tmp)"
        )
    parent = os.path.dirname(os.path.abspath(address))
    if not os.path.isdir(parent):
        raise ValueError(f"handoff address {address!r}: directory {parent!r} does not exist; create it first")


class ControlChannel:
    """A connected socket to `peer`; every wait is bounded and failures name the peer."""

    def __init__(self, sock: socket.socket, peer: str):
        self._sock = sock
        self.peer = peer
        self.peer_pid = _peer_pid(sock)
        self.closed = False

    def send(self, message: dict, blob: bytes = b"", timeout_s: float = 60.0) -> None:
        body = json.dumps(message).encode()
        self._sock.settimeout(timeout_s)
        try:
            self._sock.sendall(_FRAME.pack(len(body), len(blob)) + body + blob)
        except socket.timeout as err:
            raise PeerError(f"handoff: {self.peer} did not read its messages within {timeout_s:g} s") from err
        except OSError as err:  # EPIPE / ECONNRESET: the peer is gone
            raise PeerError(f"handoff: {self.peer} died (control socket: {err})") from err

    def readable(self) -> bool:
        """A message (or the peer's EOF, which the next recv() reports) is waiting; consumes nothing."""
        ready, _, _ = select.select([self._sock], [], [], 0)
        return bool(ready)

    def recv(self, timeout_s: float, waiting_for: str) -> tuple[dict, bytes]:
        """Next message; PeerError after `timeout_s` of silence or when the peer is gone."""
        deadline = time.monotonic() + timeout_s
        head = self._read_exact(_FRAME.size, deadline, timeout_s, waiting_for)
        body_len, blob_len = _FRAME.unpack(head)
        body = self._read_exact(body_len, deadline, timeout_s, waiting_for)
        blob = self._read_exact(blob_len, deadline, timeout_s, waiting_for) if blob_len else b""
        return json.loads(body), blob

    def _read_exact(self, n: int, deadline: float, timeout_s: float, waiting_for: str) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PeerSilent(f"handoff: {self.peer} sent nothing within {timeout_s:g} s while this side waited for "
                                 f"{waiting_for}", self.peer_pid)
            self._sock.settimeout(remaining)
            try:
                k = self._sock.recv_into(view[got:])
            except socket.timeout:
                continue  # the loop turns the expired deadline into the error above
            except OSError as err:
                raise PeerError(f"handoff: {self.peer} died (control socket: {err}) while this side waited for {waiting_for}") from err
            if k == 0:
                raise PeerError(f"handoff: {self.peer} died (control socket closed) while this side waited for {waiting_for}")
            got += k
        return bytes(buf)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._sock.close()


def listen(address: str, peer: str, startup_timeout_s: float) -> ControlChannel:
    """Engine side: wait for the trainer to connect at `address`; the path is removed once connected."""
    check_address(address)
    _remove_stale_socket(address)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(address)
        server.listen(1)
        server.settimeout(startup_timeout_s)
        try:
            conn, _ = server.accept()
        except socket.timeout as err:
            raise PeerError(f"handoff: {peer} did not connect to {address} within {startup_timeout_s:g} s") from err
    finally:
        server.close()
        _remove_stale_socket(address)
    conn.setblocking(True)
    return ControlChannel(conn, peer)


def connect(address: str, peer: str, startup_timeout_s: float) -> ControlChannel:
    """Trainer side: connect to the engine's socket, retrying while the engine is still starting."""
    check_address(address)
    deadline = time.monotonic() + startup_timeout_s
    last_error: OSError | None = None
    while time.monotonic() < deadline:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(address)
            return ControlChannel(sock, peer)
        except (FileNotFoundError, ConnectionRefusedError) as err:
            sock.close()
            last_error = err
            time.sleep(_CONNECT_RETRY_S)
    raise PeerError(f"handoff: {peer} was not listening at {address} within {startup_timeout_s:g} s (last error: {last_error})")


def _remove_stale_socket(address: str) -> None:
    # A socket file left by a crashed run would make bind() fail; anything else at the path is not ours.
    try:
        mode = os.lstat(address).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ValueError(f"handoff address {address!r} exists and is not a socket; choose another path or remove it")
    os.unlink(address)
