"""CURVE authentication and encryption for the pipeline's ZeroMQ sockets (`zmq.auth`).

Without keys the sockets carry no authentication and no encryption (ZeroMQ's NULL
mechanism): fine on loopback and ipc://, where only this machine's users reach them, and
the default. With ``transport.curve`` set:

- the feed (the publisher's PUB socket) and the tracker's prompt control socket are CURVE
  servers with ``server_secret_key``; a client must know the server's public key and
  present a key pair whose public half is one of the ``*.key`` files in
  ``allowed_clients`` (the directory layout `zmq.auth` uses). Anyone else is refused by
  the ZAP handler (`zmq.auth.ThreadAuthenticator`) during the handshake, before a single
  message passes, and counted: the node's status says ``refused_connections``;
- internal links (frames, embeddings, masks, status) that are tcp:// use the one
  ``link_secret_key`` pair at both ends: a node on another host needs that file. ipc://
  and inproc:// links never use CURVE: the run directory's permissions guard them, and
  inproc has no handshake.

Key files are `zmq.auth`'s certificates: ``NAME.key`` holds the public key, and
``NAME.key_secret`` both halves (`samstream keys` writes a pair, the secret one 0600).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import shutil
import stat
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

from pipeline.endpoints import tcp_host_port
from pipeline.wire.transport import SocketOptions, open_socket

if TYPE_CHECKING:
    from pipeline.config import CurveConfig, TransportConfig

log = logging.getLogger(__name__)

# ZAP domains: the feed's clients and the pipeline's own nodes are allowed different keys.
FEED_DOMAIN = "samstream-feed"
LINK_DOMAIN = "samstream-links"

# What a CURVE server counts as a refused connection, and what a client learns from them.
_HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)
_MECHANISM_MISMATCH = zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH
_HUNG_UP = (errno.EPIPE, errno.ECONNRESET)  # the peer closed the connection mid-handshake
_REFUSAL_LOG_INTERVAL_S = 10.0
_Z85_KEY_LENGTH = 40  # a 32-byte CURVE key in Z85 text


class CurveKeyError(ValueError):
    """A key file or folder that is missing or not what it should be; the message names it."""


@dataclass(frozen=True)
class KeyPair:
    """A CURVE key pair, both halves as Z85 text (what ZeroMQ's socket options take)."""

    public: bytes
    secret: bytes

    def apply(self, sock: zmq.Socket) -> None:
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret


def _is_curve_key(key: bytes) -> bool:
    try:
        return len(key) == _Z85_KEY_LENGTH and len(z85.decode(key)) == 32
    except (ValueError, KeyError, IndexError):
        return False


def _read_key_file(path: str | os.PathLike[str], what: str) -> tuple[Path, bytes, bytes | None]:
    """(path, public key, secret key or None) of a `zmq.auth` certificate file, both checked."""
    path = Path(path)
    if not path.is_file():
        problem = "is a directory, not a key file" if path.is_dir() else "no such file"
        raise CurveKeyError(f"{what} {path}: {problem} (make key files with `samstream keys`)")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except ValueError:
        raise CurveKeyError(
            f"{what} {path}: not a CURVE key file (no public-key line); make key files "
            "with `samstream keys`"
        ) from None
    except OSError as err:
        raise CurveKeyError(f"{what} {path}: cannot read it: {err.strerror or err}") from None
    for half, key in (("public", public), ("secret", secret)):
        if key is not None and not _is_curve_key(key):
            raise CurveKeyError(
                f"{what} {path}: the {half} key is not a CURVE key (40 Z85 characters); "
                "make key files with `samstream keys`"
            )
    return path, public, secret


def load_public_key(path: str | os.PathLike[str], *, what: str = "public key file") -> bytes:
    """The public key in ``path`` (a ``.key`` file; a ``.key_secret`` one holds it too)."""
    return _read_key_file(path, what)[1]


def load_key_pair(path: str | os.PathLike[str], *, what: str = "secret key file") -> KeyPair:
    """Both halves from a ``.key_secret`` file, checked to belong together.

    A secret file that others may read is used, with a warning: the key in it is no secret.
    """
    path, public, secret = _read_key_file(path, what)
    if secret is None:
        raise CurveKeyError(
            f"{what} {path}: holds only a public key; give the .key_secret file of the pair"
        )
    if zmq.curve_public(secret) != public:
        raise CurveKeyError(f"{what} {path}: its public and secret keys are not one pair")
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s %s can be read by other users: chmod 600 it", what, path)
    return KeyPair(public=public, secret=secret)


def load_allowed_keys(
    directory: str | os.PathLike[str], *, what: str = "allowed clients"
) -> frozenset[bytes]:
    """The public keys of the ``*.key`` files in ``directory`` (as `zmq.auth` reads it)."""
    directory = Path(directory)
    if not directory.is_dir():
        problem = "is a file, not a folder" if directory.exists() else "no such folder"
        raise CurveKeyError(
            f"{what} {directory}: {problem} (it holds the clients' public .key files)"
        )
    files = sorted(directory.glob("*.key"))
    if not files:
        raise CurveKeyError(
            f"{what} {directory}: holds no public key (*.key file): no client could connect"
        )
    return frozenset(load_public_key(f, what=f"{what} key") for f in files)


def create_key_pair(
    out_dir: str | os.PathLike[str], name: str, *, force: bool = False
) -> tuple[Path, Path]:
    """A new key pair as ``out_dir/NAME.key`` (public, 0644) and ``NAME.key_secret`` (0600);
    returns (public path, secret path). Existing files are kept unless ``force``: replacing
    a key locks out every peer that has the old one."""
    if not name or name.startswith(".") or "/" in name or os.sep in name:
        raise ValueError(f"bad key name {name!r}: a file name without '/' or a leading '.'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    public_path, secret_path = out / f"{name}.key", out / f"{name}.key_secret"
    for path in (public_path, secret_path):
        if path.exists() and not force:
            raise FileExistsError(f"{path} exists: keeping it (--force replaces the pair)")
    # zmq.auth writes the pair (its certificate format) into a folder only this user can
    # enter, so the secret file is never readable by others, not even while being written;
    # each file then gets its mode and is moved into place whole, the secret one first.
    made = tempfile.mkdtemp(prefix=f".{name}.", dir=out)
    try:
        public, secret = zmq.auth.create_certificates(made, name)
        for path, target, mode in ((secret, secret_path, 0o600), (public, public_path, 0o644)):
            os.chmod(path, mode)
            os.replace(path, target)
    finally:
        shutil.rmtree(made, ignore_errors=True)
    return public_path, secret_path


# ---------------------------------------------------------------------------------------------
# Roles: what a socket sets before it binds or connects (pipeline.wire.transport.open_socket).


@dataclass(frozen=True)
class CurveClient:
    """A connecting socket's keys: its own pair and the public key of the server it trusts."""

    keys: KeyPair
    server_public: bytes

    def apply(self, sock: zmq.Socket) -> None:
        sock.curve_serverkey = self.server_public
        self.keys.apply(sock)


@dataclass(frozen=True)
class CurveServer:
    """A bound socket's keys and the client keys it admits (made by `CurveSecurity.server`).

    Applying it also starts the watch that runs the context's ZAP handler (without one
    libzmq lets any client with the server's public key in) and counts the refusals.
    """

    security: CurveSecurity
    keys: KeyPair
    domain: str
    allowed: frozenset[bytes]

    def apply(self, sock: zmq.Socket) -> None:
        # Measured with libzmq 4.3.5: a CURVE server whose RCVHWM is 1 never takes in what
        # a client sends after the handshake (a PUB never sees the subscription, so it
        # sends nothing), while 2 works; the feed's PUB asks for 1.
        if 0 < sock.getsockopt(zmq.RCVHWM) < 2:
            sock.setsockopt(zmq.RCVHWM, 2)
        self.security.watch(sock, self)
        self.keys.apply(sock)
        sock.zap_domain = self.domain.encode()
        sock.curve_server = True


class _ZapHandler:
    """A context's ZAP thread (`zmq.auth`) and, as its credentials provider, the client keys
    admitted per ZAP domain. ZeroMQ sends all of a context's ZAP requests to one inproc
    endpoint, so there is one per context, shared by every socket served in it (each
    `_RefusalWatch` is a user) and stopped with the last."""

    running: ClassVar[dict[zmq.Context, _ZapHandler]] = {}
    lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, context: zmq.Context) -> None:
        self.auth = ThreadAuthenticator(context, log=logging.getLogger("pipeline.wire.curve.zap"))
        self.auth.start()
        self.by_domain: dict[str, set[bytes]] = {}
        self.users = 0

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self.by_domain.get(domain, ())

    @classmethod
    def acquire(cls, context: zmq.Context, domain: str, allowed: Iterable[bytes]) -> None:
        with cls.lock:
            handler = cls.running.get(context)
            if handler is None:
                handler = cls.running[context] = cls(context)
            if domain not in handler.by_domain:
                handler.auth.configure_curve_callback(domain, handler)
            handler.by_domain.setdefault(domain, set()).update(allowed)
            handler.users += 1

    @classmethod
    def release(cls, context: zmq.Context) -> None:
        with cls.lock:
            handler = cls.running[context]
            handler.users -= 1
            if handler.users == 0:
                del cls.running[context]
                # Its sockets must close before the context terminates; a ZMQError: the
                # context was destroyed first, and its sockets with it.
                with contextlib.suppress(zmq.ZMQError):
                    handler.auth.stop()


# ---------------------------------------------------------------------------------------------
# Counting refusals (server side) and explaining them (client side).


def _next_refusal(monitor: zmq.Socket) -> tuple[str, str] | None:
    """The reason and endpoint of the failed handshake ``monitor`` reports next; None when
    the watched socket has closed."""
    message = recv_monitor_message(monitor)
    event, value = message["event"], message["value"]
    if event == zmq.EVENT_MONITOR_STOPPED:
        return None
    reason = "bad_handshake"
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        reason = "key_not_allowed"
    elif event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == _MECHANISM_MISMATCH:
        reason = "no_curve"
    # The side that sees a mismatch first closes at once, so the other one often fails only
    # on a closed connection: a keyless client meets either this or a mismatch, by chance.
    elif event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL and value in _HUNG_UP:
        reason = "hung_up"
    return reason, message.get("endpoint", b"").decode(errors="replace")


_SERVER_WORDS = {
    "key_not_allowed": "a client key that is not among the allowed clients",
    "no_curve": "a client without CURVE keys",
    "bad_handshake": "a handshake that failed (wrong server key?)",
    "hung_up": "a client that hung up during the handshake (one without CURVE keys, or with "
    "the wrong server key?)",
}


class _RefusalWatch:
    """A thread counting the handshakes one bound CURVE socket refused, from the socket's
    monitor (made in the socket's thread, then used only by this one); while it runs, a user
    of the context's ZAP handler."""

    def __init__(self, sock: zmq.Socket, server: CurveServer) -> None:
        self._context = sock.context
        _ZapHandler.acquire(self._context, server.domain, server.allowed)
        self._monitor = sock.get_monitor_socket(_HANDSHAKE_FAILED)
        self._security = server.security
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="samstream-curve", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if not self._monitor.poll(100):
                    continue
                refusal = _next_refusal(self._monitor)
                if refusal is None:
                    return  # the socket closed
                self._security._count(*refusal)
        except zmq.ZMQError:
            return  # the context is going away
        finally:
            self._monitor.close(linger=0)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        _ZapHandler.release(self._context)


_T = TypeVar("_T")


def _load_named(load: Callable[..., _T], config: CurveConfig, name: str) -> _T | None:
    """What ``load`` reads from the file or folder in ``transport.curve.NAME`` (None: unset)."""
    path = getattr(config, name)
    return load(path, what=f"transport.curve.{name}") if path else None


def _uses_curve(endpoint: str, *, link: bool) -> bool:
    """Whether a socket at ``endpoint`` gets CURVE once its keys are set: an internal link
    only over tcp:// (the run directory's permissions guard ipc://), the feed and the control
    socket anywhere but inproc:// (which has no handshake)."""
    return endpoint.startswith("tcp://") if link else not endpoint.startswith("inproc://")


class CurveSecurity:
    """The CURVE keys of one process's sockets (a node, or the launcher), from
    ``transport.curve``, and the handshakes its CURVE servers refused.

    `server` and `client` give the role for a socket (None: that socket stays NULL);
    `status` is the refusals' figure for a status message, and `close` stops what CURVE
    started (after the sockets are closed, before the context terminates).
    """

    def __init__(self, config: CurveConfig) -> None:
        """Loads every key file named in ``config``: CurveKeyError names a bad one."""
        # A server key without a list of clients would let no one in; a list without one
        # would guard nothing.
        for given, needed, what in (
            ("server_secret_key", "allowed_clients", "the folder of the allowed clients' keys"),
            ("allowed_clients", "server_secret_key", "the server's .key_secret file"),
        ):
            if getattr(config, given) and not getattr(config, needed):
                raise CurveKeyError(f"transport.curve.{needed}: needed with {given}: {what}")
        # The feed's and the control socket's pair, the clients they admit, and the one pair
        # of the internal tcp links.
        self.feed_keys = _load_named(load_key_pair, config, "server_secret_key")
        self.feed_allowed = _load_named(load_allowed_keys, config, "allowed_clients")
        self.link_keys = _load_named(load_key_pair, config, "link_secret_key")
        self.refused_by_reason: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._watches: list[_RefusalWatch] = []  # one per socket served
        self._last_log = 0.0

    @classmethod
    def from_config(cls, config: CurveConfig) -> CurveSecurity | None:
        """None when ``config`` names no key: every socket as before, NULL."""
        if not (config.server_secret_key or config.allowed_clients or config.link_secret_key):
            return None
        return cls(config)

    def server(self, endpoint: str, *, link: bool = False) -> CurveServer | None:
        """The role of a socket bound at ``endpoint``: the feed or the control socket, or
        (``link``) an internal link's receiving end."""
        keys = self.link_keys if link else self.feed_keys
        if keys is None or not _uses_curve(endpoint, link=link):
            return None
        if link:  # the link's only client is the other end, with the same pair
            return CurveServer(self, keys, LINK_DOMAIN, frozenset({keys.public}))
        return CurveServer(self, keys, FEED_DOMAIN, self.feed_allowed or frozenset())

    def client(self, endpoint: str) -> CurveClient | None:
        """The role of a node's socket connecting to an internal link at ``endpoint``."""
        if self.link_keys is None or not _uses_curve(endpoint, link=True):
            return None
        return CurveClient(keys=self.link_keys, server_public=self.link_keys.public)

    def watch(self, sock: zmq.Socket, server: CurveServer) -> None:
        """Count the refusals of ``sock``, a CURVE server, until `close`."""
        with self._lock:
            self._watches.append(_RefusalWatch(sock, server))

    @property
    def refused(self) -> int:
        """Connections refused since start, for every reason."""
        return self.refused_by_reason.total()

    def _count(self, reason: str, endpoint: str) -> None:
        with self._lock:
            self.refused_by_reason[reason] += 1
            now = time.monotonic()
            if now - self._last_log < _REFUSAL_LOG_INTERVAL_S:
                return  # a refused peer that keeps retrying is logged only this often
            self._last_log = now
            log.warning(
                "refused a connection on %s: %s (%d refused so far)",
                endpoint or "a CURVE socket",
                _SERVER_WORDS[reason],
                self.refused,
            )

    def status(self) -> dict[str, Any]:
        """For a status message's detail: refusals in all, and by reason."""
        with self._lock:
            return {
                "refused_connections": self.refused,
                "refused_by_reason": dict(self.refused_by_reason),
            }

    @property
    def serving(self) -> bool:
        """Whether any socket of this process is a CURVE server (and so counts refusals)."""
        return bool(self._watches)

    def close(self) -> None:
        """Stop counting and release the ZAP handler; the sockets should be closed first."""
        with self._lock:
            watches, self._watches = self._watches, []
        for watch in watches:
            watch.close()


_CLIENT_WORDS = {
    "key_not_allowed": "the server refused this client's key: its public .key file is not "
    "in the server's transport.curve.allowed_clients folder",
    "no_curve": "the server and this client disagree on CURVE: one of them has keys and "
    "the other none (give the client key and the server key, or remove them)",
    "bad_handshake": "the CURVE handshake failed: is the server key the server's public .key file?",
    "hung_up": "the server hung up during the handshake: do the server and this client agree "
    "on CURVE (both with keys or neither), and is the server key the server's public .key file?",
}


class ClientSocket:
    """A socket connected to ``endpoint`` (a feed, a control socket) and the watch of its
    failed handshakes: a refused client hears nothing at all (ZeroMQ retries quietly, or not
    at all after a refused key), so this is how it can tell why (`hint`).

    CURVE keys are in ``client_key`` (this client's ``.key_secret`` file) and ``server_key``
    (the server's public ``.key`` file), both or neither; a missing or bad key file raises
    CurveKeyError, before any socket. `close` stops the watch and closes the socket.
    """

    def __init__(
        self,
        context: zmq.Context,
        socket_type: int,
        endpoint: str,
        options: SocketOptions,
        *,
        client_key: str | os.PathLike[str] | None,
        server_key: str | os.PathLike[str] | None,
        what: str,
    ) -> None:
        self._curve = None
        if client_key is not None or server_key is not None:
            if client_key is None or server_key is None:
                raise ValueError(
                    "CURVE needs both keys: the client's .key_secret file and the server's "
                    "public .key file"
                )
            self._curve = CurveClient(
                keys=load_key_pair(client_key, what="client key file"),
                server_public=load_public_key(server_key, what="server key file"),
            )
        self._what = what
        self._monitor: zmq.Socket | None = None
        self.failures = 0
        self.reason: str | None = None
        try:
            self.socket = open_socket(
                context, socket_type, endpoint, bind=False, options=options, security=self
            )
        except BaseException:
            if self._monitor is not None:
                self._monitor.close(linger=0)
            raise

    def apply(self, sock: zmq.Socket) -> None:
        """`open_socket`'s security hook: the keys, and the watch started before the socket
        connects, so that no refusal is missed."""
        if self._curve is not None:
            self._curve.apply(sock)
        self._monitor = sock.get_monitor_socket(_HANDSHAKE_FAILED)

    def poll(self) -> int:
        """Take the events seen so far (never waits); the failures in all."""
        while self._monitor is not None and self._monitor.poll(0):
            refusal = _next_refusal(self._monitor)
            if refusal is None:
                break
            self.failures += 1
            reason = refusal[0]
            # A specific reason is kept over a later hang-up, which could be any of them.
            if self.reason in (None, "hung_up") and reason != self.reason:
                log.warning("%s: %s", self._what, _CLIENT_WORDS[reason])
                self.reason = reason
        return self.failures

    def hint(self) -> str:
        """Why the other side refused this socket, for an error message ("" if it did not)."""
        self.poll()
        if self.reason is None:
            return ""
        return f" ({_CLIENT_WORDS[self.reason]}; {self.failures} handshake(s) failed)"

    def close(self) -> None:
        """Stop watching, then close the socket at once, discarding anything queued."""
        if self._monitor is not None:
            self.socket.disable_monitor()
            self._monitor.close(linger=0)
            self._monitor = None
        self.socket.close(linger=0)


# ---------------------------------------------------------------------------------------------
# Endpoints reachable from other hosts without CURVE.


def reachable_from_network(endpoint: str) -> bool:
    """Whether a socket bound at ``endpoint`` may be reached from other hosts: tcp:// on a
    wildcard (``*``, ``0.0.0.0``, ``::``), a LAN address, or a host or interface name."""
    if not endpoint.startswith("tcp://"):
        return False
    host = tcp_host_port(endpoint)[0].strip("[]")
    try:
        return host != "localhost" and not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True  # "*", a host or interface name: other hosts may reach it


_LINKS = ("frames", "embeddings", "masks", "status")
_EXPOSES = {
    "publish": "read every mask and status",
    "control": "add, change and remove the tracked objects",
    "frames": "read and inject video frames",
    "embeddings": "read and inject embeddings",
    "masks": "inject masks into the feed",
    "status": "read the nodes' status",
}


def exposure_warnings(transport: TransportConfig, names: Iterable[str] | None = None) -> list[str]:
    """One warning per endpoint (of ``names``, default all) bound beyond loopback without
    CURVE: what anyone who can reach it could do, and the keys that stop them."""
    curve = transport.curve
    warnings: list[str] = []
    seen: set[str] = set()
    for name in names or _EXPOSES:
        endpoint = getattr(transport, name)
        key = "link_secret_key" if name in _LINKS else "server_secret_key"
        if endpoint in seen or not reachable_from_network(endpoint) or getattr(curve, key):
            continue
        seen.add(endpoint)
        keys = key if name in _LINKS else f"{key} and allowed_clients"
        warnings.append(
            f"transport.{name} {endpoint} can be reached from other hosts without CURVE: "
            f"anyone who reaches port {tcp_host_port(endpoint)[1]} can {_EXPOSES[name]}; set "
            f"transport.curve.{keys} (README: Securing a tcp feed), or bind 127.0.0.1"
        )
    return warnings


def prompt_key_hint(transport: TransportConfig) -> str:
    """The key options `samstream prompt` needs for a control socket with CURVE ("" without)."""
    curve = transport.curve
    if not curve.server_secret_key or not _uses_curve(transport.control, link=False):
        return ""
    secret = curve.server_secret_key
    public = secret[: -len("_secret")] if secret.endswith(".key_secret") else "SERVER.key"
    return f" --client-key CLIENT.key_secret --server-key {public}"


def check_key_files(curve: CurveConfig) -> dict[str, str]:
    """Every key file and folder of ``curve`` loaded and checked (CurveKeyError names a bad
    one); returns their absolute paths by field, so that nodes started elsewhere in the
    file system read the same files."""
    CurveSecurity(curve)  # loads and checks; opens nothing
    return {
        name: str(Path(value).resolve())
        for name in ("server_secret_key", "allowed_clients", "link_secret_key")
        if (value := getattr(curve, name))
    }
