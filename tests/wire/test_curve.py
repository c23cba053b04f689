"""CURVE on the feed, the control socket and tcp links: real sockets, real `samstream` runs.

Right keys get masks and prompt replies; a wrong key or none is refused by the ZAP handler
and counted in the publisher's status; bad key files fail a run before any model loads,
naming the file; a tcp endpoint other hosts can reach without CURVE is warned about once.
"""

from __future__ import annotations

import errno
import json
import re
import signal
import stat
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgspec
import pytest
import zmq
import zmq.auth
from support.e2e import FAST, free_port

from pipeline.config import ConfigError, CurveConfig, RunConfig, TransportConfig, config_from_dict
from pipeline.run.preflight import check_curve
from pipeline.wire.client import MaskSubscriber, send_prompt
from pipeline.wire.curve import (
    ClientSocket,
    CurveKeyError,
    CurveSecurity,
    create_key_pair,
    exposure_warnings,
    load_allowed_keys,
    load_key_pair,
    reachable_from_network,
)
from pipeline.wire.messages import PromptCommand, PromptReply, StatusMessage
from pipeline.wire.transport import SocketOptions, open_socket, send_message

SOURCE = "lavfi:testsrc2=size=160x120:rate=10"
BOX = ["--box", "10", "10", "80", "80"]


def wait_for(condition, timeout_s: float, what: str) -> None:
    """Poll ``condition`` until true; generous deadlines, for a busy 2-core machine."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A server pair, an allowed client (its public key in allowed/) and a stranger."""
    root = tmp_path_factory.mktemp("keys")
    server_public, server_secret = create_key_pair(root / "server", "server")
    client_public, client_secret = create_key_pair(root / "client", "robot")
    _, stranger_secret = create_key_pair(root / "stranger", "stranger")
    allowed = root / "allowed"
    allowed.mkdir()
    (allowed / "robot.key").write_bytes(client_public.read_bytes())
    _, link_secret = create_key_pair(root / "link", "link")
    return {
        "server_public": server_public,
        "server_secret": server_secret,
        "client_secret": client_secret,
        "stranger_secret": stranger_secret,
        "allowed": allowed,
        "link_secret": link_secret,
    }


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def curve_config(keys: dict[str, Path], *, link: bool = False) -> CurveConfig:
    return CurveConfig(
        server_secret_key=str(keys["server_secret"]),
        allowed_clients=str(keys["allowed"]),
        link_secret_key=str(keys["link_secret"]) if link else None,
    )


# ---------------------------------------------------------------------------------------------
# Key files


def test_keys_command_writes_a_pair(tmp_path: Path) -> None:
    out = tmp_path / "k"
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "keys", "--out", str(out), "--name", "cam"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    public, secret = out / "cam.key", out / "cam.key_secret"
    assert str(public) in proc.stdout and str(secret) in proc.stdout
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    # zmq.auth reads them: the public file has only the public key, the secret one both.
    pub_key, no_secret = zmq.auth.load_certificate(public)
    same_pub, sec_key = zmq.auth.load_certificate(secret)
    assert no_secret is None and pub_key == same_pub and zmq.curve_public(sec_key) == pub_key
    assert zmq.auth.load_certificates(out) == {pub_key: True}
    # A second run keeps the pair: replacing it would lock out every peer that has it.
    again = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "keys", "--out", str(out), "--name", "cam"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 2 and "--force" in again.stderr
    assert zmq.auth.load_certificate(public)[0] == pub_key


def test_bad_key_files_are_named(tmp_path: Path, keys: dict[str, Path]) -> None:
    garbage = tmp_path / "garbage.key_secret"
    garbage.write_bytes(b"\x00\xffnot a certificate\n")
    short = tmp_path / "short.key_secret"
    short.write_text('curve\n    public-key = "abc"\n    secret-key = "def"\n')
    cases = [
        (tmp_path / "missing.key_secret", "no such file"),
        (garbage, "not a CURVE key file"),
        (short, "not a CURVE key"),
        (keys["server_public"], "holds only a public key"),
        (tmp_path, "is a directory"),
    ]
    for path, problem in cases:
        with pytest.raises(CurveKeyError, match=problem) as info:
            load_key_pair(path)
        assert str(path) in str(info.value)
    # Halves of two different pairs.
    mixed = tmp_path / "mixed.key_secret"
    other = zmq.auth.load_certificate(keys["stranger_secret"])[1].decode()
    text = keys["server_secret"].read_text()
    mine = zmq.auth.load_certificate(keys["server_secret"])[1].decode()
    mixed.write_text(text.replace(mine, other))
    with pytest.raises(CurveKeyError, match="not one pair"):
        load_key_pair(mixed)
    with pytest.raises(CurveKeyError, match="holds no public key"):
        load_allowed_keys(_empty_dir(tmp_path))
    with pytest.raises(CurveKeyError, match="no such folder"):
        load_allowed_keys(tmp_path / "nowhere")


def _empty_dir(tmp_path: Path) -> Path:
    path = tmp_path / "empty"
    path.mkdir()
    return path


def test_config_section_is_checked(keys: dict[str, Path]) -> None:
    assert RunConfig().transport.curve == CurveConfig()  # no keys by default
    cfg = config_from_dict(
        {
            "transport": {
                "curve": {
                    "server_secret_key": str(keys["server_secret"]),
                    "allowed_clients": str(keys["allowed"]),
                }
            }
        }
    )
    assert cfg.transport.curve.server_secret_key == str(keys["server_secret"])
    with pytest.raises(CurveKeyError, match=r"transport\.curve\.allowed_clients: needed with"):
        check_curve(config_from_dict({"transport": {"curve": {"server_secret_key": "s"}}}))
    with pytest.raises(CurveKeyError, match=r"transport\.curve\.server_secret_key: needed with"):
        check_curve(config_from_dict({"transport": {"curve": {"allowed_clients": "clients"}}}))
    with pytest.raises(ConfigError, match=r"transport\.curve\.link_secret_key: must be"):
        config_from_dict({"transport": {"curve": {"link_secret_key": ""}}})


def test_preflight_names_the_bad_key_file(tmp_path: Path, keys: dict[str, Path]) -> None:
    good = curve_config(keys, link=True)
    checked = check_curve(RunConfig(transport=TransportConfig(curve=good)))
    assert Path(checked.transport.curve.server_secret_key).is_absolute()
    missing = tmp_path / "gone.key_secret"
    for field, value in [
        ("server_secret_key", missing),
        ("link_secret_key", missing),
        ("allowed_clients", tmp_path / "no-such-folder"),
    ]:
        bad = RunConfig(
            transport=TransportConfig(
                curve=CurveConfig(**{**msgspec.structs.asdict(good), field: str(value)})
            )
        )
        with pytest.raises(CurveKeyError, match=rf"transport\.curve\.{field} {value}"):
            check_curve(bad)


# ---------------------------------------------------------------------------------------------
# Real sockets: the feed's PUB and the control REP with CURVE


@pytest.fixture
def feed(ctx: zmq.Context, keys: dict[str, Path]):
    """A CURVE PUB socket, as the publisher binds it, sending statuses until closed."""
    security = CurveSecurity(curve_config(keys))
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    pub = open_socket(
        ctx,
        zmq.PUB,
        endpoint,
        bind=True,
        options=SocketOptions(sndhwm=100, rcvhwm=1),
        security=security.server(endpoint),
    )
    yield pub, endpoint, security
    pub.close(linger=0)
    security.close()


def heartbeat_until(pub: zmq.Socket, condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        send_message(pub, StatusMessage("publisher", "running", time.time()))
        time.sleep(0.05)


def test_feed_right_key_receives(feed, ctx: zmq.Context, keys: dict[str, Path]) -> None:
    pub, endpoint, security = feed
    with MaskSubscriber(
        endpoint,
        timeout_ms=500,
        context=ctx,
        client_key=keys["client_secret"],
        server_key=keys["server_public"],
    ) as sub:

        def joined() -> bool:
            sub.recv_event(20)
            return sub.last_status is not None

        heartbeat_until(pub, joined, 30, "the subscriber with the right key")
        assert sub.handshake_failures == 0
    assert security.refused == 0


@pytest.mark.parametrize(
    ("client", "server", "reasons", "hint"),
    [
        ("stranger_secret", "server_public", {"key_not_allowed"}, "refused this client's key"),
        # Whichever side reads the other's greeting first sees the mismatch and closes; the
        # other sees only the hang-up. Which one it is can be the same on every retry.
        (None, None, {"no_curve", "hung_up"}, "disagree on CURVE|hung up during the handshake"),
        # An allowed client that trusts another server's key: the handshake cannot succeed.
        ("client_secret", "stranger_secret", {"bad_handshake"}, "is the server key"),
    ],
)
def test_feed_refuses_wrong_or_no_key(
    feed,
    ctx: zmq.Context,
    keys: dict[str, Path],
    client: str | None,
    server: str | None,
    reasons: set[str],
    hint: str,
) -> None:
    pub, endpoint, security = feed
    key_args = {}
    if client is not None and server is not None:
        key_args = {"client_key": keys[client], "server_key": keys[server]}
    with MaskSubscriber(endpoint, timeout_ms=300, context=ctx, **key_args) as sub:

        def timeout_message() -> str:
            with pytest.raises(TimeoutError) as raised:
                next(iter(sub))
            return str(raised.value)

        heartbeat_until(
            pub,
            lambda: reasons & security.status()["refused_by_reason"].keys(),
            60,
            f"a refusal counted as one of {sorted(reasons)}",
        )
        for _ in range(10):  # it never gets a single message
            send_message(pub, StatusMessage("publisher", "running", time.time()))
            assert sub.recv_event(30) is None
        assert sub.last_status is None
        wait_for(
            lambda: re.search(hint, timeout_message()),
            60,
            f"the subscriber's error to say {hint!r}",
        )
        assert sub.handshake_failures >= 1
    assert security.status()["refused_connections"] == security.refused


def _monitor_event(event: int, value: int) -> list[bytes]:
    """A socket-monitor message as libzmq sends it: event and value, then the endpoint."""
    return [struct.pack("=HI", event, value), b"tcp://127.0.0.1:1"]


def test_handshake_watch_keeps_the_specific_reason_over_a_hang_up(ctx: zmq.Context) -> None:
    """A keyless client sometimes sees only the server closing (EPIPE, ECONNRESET) and a
    mismatch on a retry; the hint names the mismatch, whichever came first."""
    watch = ClientSocket(
        ctx,
        zmq.SUB,
        f"tcp://127.0.0.1:{free_port()}",  # nobody there: no event of its own
        SocketOptions(sndhwm=1, rcvhwm=1),
        client_key=None,
        server_key=None,
        what="test feed",
    )
    sender = ctx.socket(zmq.PAIR)
    # A PAIR socket stands in for the socket's own monitor.
    own_monitor, watch._monitor = watch._monitor, ctx.socket(zmq.PAIR)
    try:
        port = watch._monitor.bind_to_random_port("tcp://127.0.0.1")
        sender.connect(f"tcp://127.0.0.1:{port}")
        events = [
            (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, errno.EPIPE),
            (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH),
            (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, errno.ECONNRESET),
        ]
        reasons = []
        for count, (event, value) in enumerate(events, start=1):
            sender.send_multipart(_monitor_event(event, value))
            wait_for(lambda n=count: watch.poll() == n, 30, f"monitor event {count}")
            reasons.append(watch.reason)
        assert reasons == ["hung_up", "no_curve", "no_curve"]
        assert "disagree on CURVE" in watch.hint() and "3 handshake(s) failed" in watch.hint()
    finally:
        sender.close(linger=0)
        watch._monitor.close(linger=0)
        watch._monitor = own_monitor
        watch.close()


def test_subscriber_needs_both_keys(keys: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="needs both keys"):
        MaskSubscriber("tcp://127.0.0.1:9", client_key=keys["client_secret"])
    with pytest.raises(CurveKeyError, match=r"server key file .*no such file"):
        MaskSubscriber(
            "tcp://127.0.0.1:9", client_key=keys["client_secret"], server_key="/nonexistent.key"
        )


def test_control_socket_with_curve(ctx: zmq.Context, keys: dict[str, Path]) -> None:
    security = CurveSecurity(curve_config(keys))
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    rep = open_socket(
        ctx,
        zmq.REP,
        endpoint,
        bind=True,
        options=SocketOptions(sndhwm=10, rcvhwm=10),
        security=security.server(endpoint),
    )
    poller = zmq.Poller()
    poller.register(rep, zmq.POLLIN)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            if poller.poll(50):
                rep.recv()
                rep.send(PromptReply(ok=True, tracks=()).to_json())

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        command = PromptCommand(op="list")
        reply = send_prompt(
            endpoint,
            command,
            timeout_s=30,
            context=ctx,
            client_key=keys["client_secret"],
            server_key=keys["server_public"],
        )
        assert reply.ok
        with pytest.raises(TimeoutError, match="refused this client's key"):
            send_prompt(
                endpoint,
                command,
                timeout_s=3,
                context=ctx,
                client_key=keys["stranger_secret"],
                server_key=keys["server_public"],
            )
        with pytest.raises(TimeoutError, match="disagree on CURVE"):
            send_prompt(endpoint, command, timeout_s=3, context=ctx)
        wait_for(lambda: security.refused >= 2, 30, "two refusals")
    finally:
        stop.set()
        server.join()
        rep.close(linger=0)
        security.close()


# ---------------------------------------------------------------------------------------------
# Endpoints other hosts can reach


@pytest.mark.parametrize(
    ("endpoint", "reachable"),
    [
        ("tcp://0.0.0.0:5555", True),
        ("tcp://*:5555", True),
        ("tcp://[::]:5555", True),
        ("tcp://192.168.1.20:5555", True),
        ("tcp://eth0:5555", True),
        ("tcp://127.0.0.1:5555", False),
        ("tcp://127.0.0.2:5555", False),
        ("tcp://localhost:5555", False),
        ("tcp://[::1]:5555", False),
        ("ipc:///tmp/x", False),
        ("inproc://x", False),
        ("auto", False),
    ],
)
def test_reachable_from_network(endpoint: str, reachable: bool) -> None:
    assert reachable_from_network(endpoint) is reachable


def test_exposure_warnings_once_per_endpoint(keys: dict[str, Path]) -> None:
    transport = TransportConfig(
        publish="tcp://0.0.0.0:6001", control="tcp://0.0.0.0:6002", frames="tcp://*:6003"
    )
    warnings = exposure_warnings(transport)
    assert len(warnings) == 3
    assert "transport.publish tcp://0.0.0.0:6001" in warnings[0] and "without CURVE" in warnings[0]
    assert exposure_warnings(TransportConfig(publish="tcp://127.0.0.1:6001")) == []
    guarded = TransportConfig(
        publish="tcp://0.0.0.0:6001",
        control="tcp://0.0.0.0:6002",
        frames="tcp://*:6003",
        curve=curve_config(keys, link=True),
    )
    assert exposure_warnings(guarded) == []
    feed_only = TransportConfig(publish="tcp://0.0.0.0:6001", curve=curve_config(keys))
    assert exposure_warnings(feed_only) == []


# ---------------------------------------------------------------------------------------------
# Whole runs through `samstream run`


def _curve_sets(keys: dict[str, Path], *, link: bool = False) -> list[str]:
    sets = [
        "--set",
        f"transport.curve.server_secret_key={keys['server_secret']}",
        "--set",
        f"transport.curve.allowed_clients={keys['allowed']}",
    ]
    if link:
        sets += ["--set", f"transport.curve.link_secret_key={keys['link_secret']}"]
    return sets


def _prompt(endpoint: str, *key_args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "prompt",
            "list",
            "--endpoint",
            endpoint,
            "--timeout",
            "20",
            *key_args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_live_run_with_curve(checkpoint: Path, keys: dict[str, Path]) -> None:
    """Right key: masks and prompt replies; wrong key or none: refused, counted in the
    publisher's status. The feed binds every interface, with CURVE: no warning."""
    port = free_port()
    control = f"tcp://127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "run",
            "--source",
            SOURCE,
            "--realtime",
            *BOX,
            "--weights",
            str(checkpoint),
            *FAST,
            "--set",
            f"transport.publish={json.dumps(f'tcp://0.0.0.0:{port}')}",
            "--set",
            f"transport.control={json.dumps(control)}",
            *_curve_sets(keys),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    feed = f"tcp://127.0.0.1:{port}"
    right = {"client_key": keys["client_secret"], "server_key": keys["server_public"]}
    wrong = {"client_key": keys["stranger_secret"], "server_key": keys["server_public"]}
    try:
        with (
            MaskSubscriber(feed, timeout_ms=120_000, **right) as sub,
            MaskSubscriber(feed, timeout_ms=1000, **wrong) as stranger,
            MaskSubscriber(feed, timeout_ms=1000) as keyless,
        ):
            frame = sub.recv(180_000)
            assert frame is not None, "no masks with the right key"
            assert len(frame.tracks) == 1 and frame.masks.shape[1:] == (120, 160)
            ok = _prompt(
                control,
                "--client-key",
                str(keys["client_secret"]),
                "--server-key",
                str(keys["server_public"]),
            )
            assert ok.returncode == 0, ok.stderr
            assert json.loads(ok.stdout)["ok"] is True
            refused = _prompt(
                control,
                "--client-key",
                str(keys["stranger_secret"]),
                "--server-key",
                str(keys["server_public"]),
            )
            assert refused.returncode != 0 and "refused this client's key" in refused.stderr

            def counted() -> bool:
                event = sub.recv_event(1000)
                assert event is not None, "the feed went silent"
                status = sub.statuses.get("publisher")
                if status is None:
                    return False
                reasons = status.detail.get("refused_by_reason", {})
                # The keyless client is counted as no_curve or, when it was the side that saw
                # the mismatch first and closed, as hung_up.
                keyless = reasons.get("no_curve", 0) + reasons.get("hung_up", 0)
                return reasons.get("key_not_allowed", 0) >= 1 and keyless >= 1

            wait_for(counted, 120, "the publisher's status to count both refusals by reason")
            for other in (stranger, keyless):
                assert other.recv_event(0) is None and other.last_status is None
                assert other.handshake_failures >= 1
        proc.send_signal(signal.SIGTERM)
        _stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert "without CURVE" not in stderr, stderr
    assert f"samstream: masks on tcp://0.0.0.0:{port}" in stderr
    assert "--client-key CLIENT.key_secret --server-key" in stderr  # the prompt hint


@pytest.mark.slow
def test_offline_run_over_curve_links_warns_for_open_feed(
    checkpoint: Path, keys: dict[str, Path], tmp_path: Path
) -> None:
    """Every internal link over tcp with the link key (one bound on every interface), the
    feed on every interface without CURVE: the run completes, with one warning, for the
    feed only."""
    port = free_port()
    links = {
        "frames": f"tcp://0.0.0.0:{free_port()}",
        "embeddings": f"tcp://127.0.0.1:{free_port()}",
        "masks": f"tcp://127.0.0.1:{free_port()}",
        "status": f"tcp://127.0.0.1:{free_port()}",
    }
    sets = []
    for name, endpoint in links.items():
        sets += ["--set", f"transport.{name}={json.dumps(endpoint)}"]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "run",
            "--source",
            SOURCE,
            "--max-frames",
            "3",
            *BOX,
            "--weights",
            str(checkpoint),
            "--out",
            str(tmp_path / "out"),
            *FAST,
            "--set",
            f"transport.publish={json.dumps(f'tcp://0.0.0.0:{port}')}",
            "--set",
            f"transport.curve.link_secret_key={keys['link_secret']}",
            *sets,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "frames in 3, out 3" in proc.stdout
    warnings = [line for line in proc.stderr.splitlines() if "without CURVE" in line]
    assert len(warnings) == 1, proc.stderr
    assert f"transport.publish tcp://0.0.0.0:{port}" in warnings[0]
    assert warnings[0].startswith("samstream: warning:")
    assert len((tmp_path / "out" / "masks.jsonl").read_text().splitlines()) == 3


@pytest.mark.parametrize(
    ("key", "make", "problem"),
    [
        ("server_secret_key", lambda d: d / "missing.key_secret", "no such file"),
        ("server_secret_key", "garbage", "not a CURVE key file"),
        ("allowed_clients", lambda d: d / "nobody", "no such folder"),
        ("link_secret_key", "garbage", "not a CURVE key file"),
    ],
)
def test_run_with_a_bad_key_file_fails_at_start(
    keys: dict[str, Path], tmp_path: Path, key: str, make, problem: str
) -> None:
    if make == "garbage":
        path = tmp_path / "garbage.key_secret"
        path.write_text("this is not a key\n")
    else:
        path = make(tmp_path)
    values = {
        "server_secret_key": str(keys["server_secret"]),
        "allowed_clients": str(keys["allowed"]),
        "link_secret_key": str(keys["link_secret"]),
        key: str(path),
    }
    sets = []
    for name, value in values.items():
        sets += ["--set", f"transport.curve.{name}={value}"]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "run",
            "--source",
            SOURCE,
            "--max-frames",
            "2",
            *BOX,
            # Checked after the keys: a run that got this far would fail on the weights.
            "--weights",
            str(tmp_path / "no-weights.pt"),
            "--device",
            "cpu",
            *FAST,
            *sets,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert f"transport.curve.{key} {path}: {problem}" in proc.stderr
    assert "masks on" not in proc.stderr  # no node was started
