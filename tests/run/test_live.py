"""Live mode's building blocks: settings resolution, frame timings, the newest-frame inbox and
a live NodeRunner pair, all on the CPU with real ZeroMQ sockets (no models)."""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq
from support.rtsp import free_port

from pipeline.config import (
    DecoderConfig,
    EncoderConfig,
    LiveConfig,
    RunConfig,
    TrackerConfig,
    config_from_dict,
    validate_config,
)
from pipeline.run import live as live_module
from pipeline.run.inbox import NewestInbox
from pipeline.run.live import (
    CPU_BUDGET_MS,
    CPU_LIVE_IMAGE_SIZE,
    GPU_BUDGET_MS,
    FrameTimings,
    percentiles,
    resolve_run_config,
    source_is_live,
)
from pipeline.run.runtime import Node, NodeEndpoints, NodeRunner
from pipeline.run.workers import node_environment
from pipeline.wire.messages import EndOfStream, FrameMessage, FrameMeta, Message, StatusMessage
from pipeline.wire.transport import MessageReceiver, SocketOptions, open_socket, send_message

pytestmark = pytest.mark.timeout(60)

OPTIONS = SocketOptions(sndhwm=1000, rcvhwm=1000)


def no_cuda_call() -> bool:
    raise AssertionError("cuda_available() called although no device is 'auto'")


def config(
    source: str = "",
    *,
    mode: str = "auto",
    device: str = "auto",
    tracker_device: str | None = None,
    image_size: int | None = None,
    budget_ms: float | None = None,
) -> RunConfig:
    return RunConfig(
        decoder=DecoderConfig(source=source),
        encoder=EncoderConfig(device=device, image_size=image_size),
        tracker=TrackerConfig(device=device if tracker_device is None else tracker_device),
        live=LiveConfig(mode=mode, budget_ms=budget_ms),
    )


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.005)


# -- resolve_run_config, source_is_live --------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "live"),
    [
        ("rtsp://cam.local:554/stream", True),
        ("RTSP://user:pw@10.0.0.2/live", True),
        ("rtsps://cam.local/stream", True),
        ("/dev/video0", True),
        ("/dev/video12", True),
        ("0", True),
        ("3", True),
        ("lavfi:testsrc2=size=64x48", False),
        ("testsrc2", False),
        ("/dev/videoX", False),  # not a webcam node: a (missing) file
        ("missing-file.mp4", False),  # a bad source is not live: the decoder reports it
        ("", False),
    ],
)
def test_source_is_live(source: str, live: bool) -> None:
    assert source_is_live(source) is live


def test_auto_mode_follows_the_source(tmp_path: Path) -> None:
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"not looked at")
    cases = {
        "rtsp://cam/stream": "live",
        "/dev/video0": "live",
        "2": "live",
        str(clip): "offline",
        "lavfi:testsrc2": "offline",
        "": "offline",
    }
    for source, mode in cases.items():
        resolved = resolve_run_config(config(source), cuda_available=lambda: False)
        assert resolved.live.mode == mode, source


def test_explicit_mode_is_kept(tmp_path: Path) -> None:
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"x")
    live_file = resolve_run_config(config(str(clip), mode="live"), cuda_available=lambda: False)
    assert live_file.live.mode == "live"
    camera = resolve_run_config(
        config("rtsp://cam/x", mode="offline"), cuda_available=lambda: False
    )
    assert camera.live.mode == "offline"
    # Offline on a CPU: the full image size, the CPU budget.
    assert camera.encoder.image_size == 1024 and camera.live.budget_ms == CPU_BUDGET_MS


@pytest.mark.parametrize(
    ("cuda", "mode", "device", "size", "budget"),
    [
        (False, "live", "cpu", CPU_LIVE_IMAGE_SIZE, CPU_BUDGET_MS),
        (False, "offline", "cpu", 1024, CPU_BUDGET_MS),
        (True, "live", "cuda", 1024, GPU_BUDGET_MS),
        (True, "offline", "cuda", 1024, GPU_BUDGET_MS),
    ],
)
def test_auto_device_image_size_and_budget(
    cuda: bool, mode: str, device: str, size: int, budget: float
) -> None:
    calls = []

    def cuda_available() -> bool:
        calls.append(1)
        return cuda

    resolved = resolve_run_config(config("rtsp://cam/x", mode=mode), cuda_available=cuda_available)
    assert len(calls) == 1  # asked once for both devices
    assert (resolved.encoder.device, resolved.tracker.device) == (device, device)
    assert resolved.encoder.image_size == size
    assert resolved.live.budget_ms == budget
    assert resolved.live.mode == mode
    validate_config(resolved)  # the result is a valid config


def test_explicit_values_are_kept_and_cuda_is_not_asked() -> None:
    cfg = config(
        "/dev/video0", device="cuda:1", tracker_device="cpu", image_size=768, budget_ms=50.0
    )
    resolved = resolve_run_config(cfg, cuda_available=no_cuda_call)
    assert resolved.encoder.device == "cuda:1" and resolved.tracker.device == "cpu"
    assert resolved.encoder.image_size == 768
    assert resolved.live.budget_ms == 50.0
    assert resolved.live.mode == "live"


def test_explicit_cpu_encoder_live_gets_the_small_size() -> None:
    # The encoder's device decides size and budget, whatever the tracker runs on.
    cfg = config("rtsp://cam/x", device="cpu", tracker_device="cuda")
    resolved = resolve_run_config(cfg, cuda_available=no_cuda_call)
    assert resolved.encoder.image_size == CPU_LIVE_IMAGE_SIZE
    assert resolved.live.budget_ms == CPU_BUDGET_MS
    gpu = resolve_run_config(
        config("rtsp://cam/x", device="cuda:0", tracker_device="auto"), cuda_available=lambda: False
    )
    assert gpu.encoder.device == "cuda:0" and gpu.tracker.device == "cpu"  # tracker was auto
    assert gpu.encoder.image_size == 1024 and gpu.live.budget_ms == GPU_BUDGET_MS


@pytest.mark.parametrize("cuda", [False, True])
@pytest.mark.parametrize("source", ["rtsp://cam/x", "lavfi:testsrc2", "0"])
def test_resolving_is_idempotent(source: str, cuda: bool) -> None:
    once = resolve_run_config(config(source), cuda_available=lambda: cuda)
    assert "auto" not in (once.live.mode, once.encoder.device, once.tracker.device)
    assert once.encoder.image_size is not None and once.live.budget_ms is not None
    assert resolve_run_config(once, cuda_available=no_cuda_call) == once
    # The input is not modified (frozen dataclasses, replaced rather than changed).
    assert config(source).live.mode == "auto"


# -- percentiles, FrameTimings ---------------------------------------------------------------


def test_percentiles() -> None:
    assert percentiles([]) is None
    assert percentiles(iter([])) is None
    assert percentiles([7.0]) == {"median": 7.0, "p95": 7.0}
    assert percentiles(float(v) for v in range(100, 0, -1)) == {"median": 50.5, "p95": 95.0}
    # Nearest rank: of 20 values, the 19th.
    assert percentiles(range(1, 21)) == {"median": 10.5, "p95": 19}
    assert percentiles([1 / 3, 2 / 3]) == {"median": 0.5, "p95": 0.667}


def test_frame_timings_sum_stages_and_count_the_budget() -> None:
    timings = FrameTimings(budget_ms=10.0)
    assert timings.share_within_budget is None
    assert timings.summary()["share_within_budget"] is None
    # processing = decode + encoder + tracker + publish; latency and other keys are not in it.
    assert (
        timings.add(
            {"decode": 1, "encoder": 2, "tracker": 3, "publish": 4, "latency": 80, "other": 99}
        )
        == 10.0
    )  # exactly the budget: within
    assert timings.add({"encoder": 8.5, "tracker": 2.0, "latency": 40}) == 10.5  # over
    assert timings.add({}) == 0.0
    assert (timings.frames, timings.within_budget) == (3, 2)
    assert timings.share_within_budget == pytest.approx(2 / 3)

    assert timings.interval() == {
        "frames": 3,
        "over_budget": 1,
        "latency_ms": {"median": 60.0, "p95": 80},
    }
    assert timings.interval() == {"frames": 0, "over_budget": 0, "latency_ms": None}
    timings.add({"decode": 20.0})
    assert timings.interval() == {"frames": 1, "over_budget": 1, "latency_ms": None}

    summary = timings.summary()
    assert summary["budget_ms"] == 10.0
    assert (summary["frames"], summary["within_budget"]) == (4, 2)
    assert summary["share_within_budget"] == 0.5
    ms = summary["ms"]
    assert ms["processing"] == {"median": 10.25, "p95": 20.0}
    assert ms["latency"] == {"median": 60.0, "p95": 80}
    assert ms["encoder"] == {"median": 5.25, "p95": 8.5}
    assert ms["decode"] == {"median": 10.5, "p95": 20.0}
    assert set(ms) == {"decode", "encoder", "tracker", "publish", "latency", "other", "processing"}


def test_frame_timings_share_is_rounded_and_percentiles_use_the_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(live_module, "WINDOW", 3)
    timings = FrameTimings(budget_ms=5.0)
    for ms in (1.0, 2.0, 100.0, 3.0, 4.0, 6.0):
        timings.add({"encoder": ms})
    summary = timings.summary()
    assert summary["frames"] == 6 and summary["within_budget"] == 4  # all frames counted
    assert summary["share_within_budget"] == 0.6667
    # Only the 3 most recent frames are in the percentiles.
    assert summary["ms"]["encoder"] == {"median": 4.0, "p95": 6.0}


# -- NewestInbox -------------------------------------------------------------------------------


def frame(seq: int, stream: str = "cam0") -> FrameMessage:
    meta = FrameMeta(stream, seq, seq, seq, (1, 25), time.time())
    return FrameMessage(meta=meta, image=np.full((4, 6, 3), seq % 256, np.uint8))


def status(n: int, node: str = "decoder") -> StatusMessage:
    return StatusMessage(node, "running", float(n), {"n": n}, {})


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture(params=["ipc", "tcp"])
def endpoint(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "ipc":
        return f"ipc://{tmp_path}/frames"
    return f"tcp://127.0.0.1:{free_port()}"


@pytest.fixture
def link(ctx: zmq.Context, endpoint: str) -> Iterator[tuple[zmq.Socket, MessageReceiver, str]]:
    """A bound PULL socket read by a MessageReceiver and a PUSH socket connected to it."""
    pull = open_socket(ctx, zmq.PULL, endpoint, bind=True, options=OPTIONS)
    address = pull.getsockopt(zmq.LAST_ENDPOINT).decode()
    push = open_socket(ctx, zmq.PUSH, address, bind=False, options=OPTIONS)
    yield push, MessageReceiver(pull), address


@pytest.fixture
def inbox(link) -> Iterator[NewestInbox]:
    box = NewestInbox(link[1])
    yield box
    box.close()


def inbox_threads() -> int:
    return sum(t.name == "samstream-inbox" for t in threading.enumerate())


def test_burst_while_busy_keeps_only_the_newest(link, inbox: NewestInbox) -> None:
    push, _, _ = link
    n = 50
    for seq in range(n):  # the consumer is "busy": nobody calls take() meanwhile
        send_message(push, frame(seq))
    wait_for(lambda: inbox.dropped == n - 1, 5.0, f"{n - 1} drops (have {inbox.dropped})")
    newest, end, statuses = inbox.take(1.0)
    assert isinstance(newest, FrameMessage) and newest.meta.seq == n - 1
    assert np.all(newest.image == n - 1)
    assert end is None and statuses == []
    assert inbox.dropped == n - 1
    # Nothing left: take waits its timeout and returns nothing.
    started = time.monotonic()
    assert inbox.take(0.05) == (None, None, [])
    assert time.monotonic() - started >= 0.04  # it waited its timeout (a hang: test timeout)
    # A frame that comes while the consumer is free is not a drop.
    send_message(push, frame(n))
    newest, _, _ = inbox.take(5.0)
    assert newest is not None and newest.meta.seq == n
    assert inbox.dropped == n - 1


def test_take_wakes_up_when_a_frame_arrives(link, inbox: NewestInbox) -> None:
    push, _, _ = link
    sender = threading.Timer(0.2, send_message, args=(push, frame(0)))
    sender.start()
    try:
        started = time.monotonic()
        newest, end, _ = inbox.take(10.0)
        waited = time.monotonic() - started
    finally:
        sender.join()
    assert newest is not None and newest.meta.seq == 0 and end is None
    assert 0.1 <= waited < 2.0  # woken by the frame, not by the 10 s timeout


def test_end_arrives_although_the_sender_closes_at_once(ctx: zmq.Context, link) -> None:
    # What ruled out ZeroMQ's CONFLATE: a finished sender sends its last frame and the end
    # marker and closes its socket at once; the receiver must still get both.
    push, receiver, address = link
    push.close(linger=0)  # the fixture's sender is not used: one that comes and goes
    box = NewestInbox(receiver)
    try:
        for round_ in range(3):
            sender = open_socket(ctx, zmq.PUSH, address, bind=False, options=OPTIONS)
            frames = 5
            for seq in range(frames):
                send_message(sender, frame(seq, stream=f"s{round_}"))
            end = EndOfStream(stream_id=f"s{round_}", frames=frames, reason="eof")
            send_message(sender, end)
            sender.close(linger=-1)  # the runtime's clean close: flush, then go
            got_frames: list[int] = []
            got_end = None
            deadline = time.monotonic() + 5.0
            while got_end is None and time.monotonic() < deadline:
                newest, got_end, _ = box.take(0.1)
                if newest is not None:
                    assert got_end is None  # never both: the frame first, then the end
                    got_frames.append(newest.meta.seq)
            assert got_end == end, f"round {round_}: the end marker was lost"
            # The last frame before the end is never replaced by the end marker.
            assert got_frames and got_frames[-1] == frames - 1
            assert len(got_frames) + box.dropped == frames
            # The end marker stays: every later take returns it (the consumer stops at it).
            assert box.take(0.0) == (None, end, [])
            # The inbox stops reading at the end marker; a new one serves the next stream.
            box.close()
            assert inbox_threads() == 0
            box = NewestInbox(receiver)
    finally:
        box.close()


def test_end_waits_for_the_frame_before_it(link, inbox: NewestInbox) -> None:
    push, _, _ = link
    end = EndOfStream(stream_id="cam0", frames=2, reason="eof")
    for msg in (frame(0), frame(1), end):
        send_message(push, msg)
    wait_for(lambda: inbox.dropped == 1, 5.0, "the first frame to be replaced")
    # Both frames and the end are in by now (the thread stops reading at the end).
    wait_for(lambda: inbox_threads() == 0, 5.0, "the inbox thread to stop at the end")
    newest, got_end, _ = inbox.take(1.0)
    assert newest is not None and newest.meta.seq == 1 and got_end is None
    assert inbox.take(1.0) == (None, end, [])


def test_statuses_are_never_dropped(link, inbox: NewestInbox) -> None:
    """Statuses of three nodes, interleaved with frames, piled up while the consumer was
    busy: every one comes out, in order (a "stalled" at once followed by "reconnecting"
    must reach the consumers as well as the "reconnecting")."""
    push, _, _ = link
    nodes = ("decoder", "encoder", "tracker")
    sent_statuses = [status(n, nodes[n % 3]) for n in range(30)]
    frames = 30
    messages: list[Message] = []
    statuses = iter(sent_statuses)
    for seq in range(frames):
        messages.append(frame(seq))
        if seq % 3 == 2:
            messages.append(next(statuses))
    messages.extend(statuses)
    end = EndOfStream(stream_id="cam0", frames=frames, reason="eof")
    messages.append(end)
    for msg in messages:
        send_message(push, msg)
    got_statuses: list[StatusMessage] = []
    got_frames: list[int] = []
    got_end = None
    deadline = time.monotonic() + 5.0
    while got_end is None and time.monotonic() < deadline:
        newest, got_end, batch = inbox.take(0.1)
        got_statuses += batch
        if newest is not None:
            got_frames.append(newest.meta.seq)
    assert got_end == end
    assert got_statuses == sent_statuses
    assert got_frames[-1] == frames - 1
    assert got_frames == sorted(set(got_frames))
    assert len(got_frames) + inbox.dropped == frames


def test_malformed_messages_are_skipped_not_kept(link, inbox: NewestInbox) -> None:
    push, receiver, _ = link
    send_message(push, frame(0))
    push.send_multipart([b"garbage"])
    wait_for(lambda: receiver.rejected == 1, 5.0, "the malformed message to be rejected")
    newest, _, _ = inbox.take(1.0)
    assert newest is not None and newest.meta.seq == 0
    assert inbox.dropped == 0


def test_close_stops_the_thread_and_hands_the_socket_back(link) -> None:
    push, receiver, _ = link
    before = inbox_threads()
    box = NewestInbox(receiver)
    assert inbox_threads() == before + 1
    box.close()  # returns once the thread has ended (within about one poll interval)
    assert inbox_threads() == before
    send_message(push, frame(7))
    msg = receiver.recv(5000)  # the socket is the caller's again
    assert isinstance(msg, FrameMessage) and msg.meta.seq == 7


# -- NodeRunner(live=True) ---------------------------------------------------------------------


class BurstSource(Node):
    """Sends ``frames`` frames, one every ``interval_s``, then the end of the stream."""

    name = "decoder"
    outputs = (FrameMessage,)

    def __init__(self, frames: int, interval_s: float, start: threading.Event) -> None:
        super().__init__()
        self.frames = frames
        self.interval_s = interval_s
        self.start = start

    def produce(self) -> Iterator[Message | None]:
        self.start.wait(10.0)  # the consumer is up and draining
        for seq in range(self.frames):
            yield frame(seq)
            self.counters["frames"] = seq + 1
            time.sleep(self.interval_s)  # a camera's pace (a busy loop would starve the GIL)
            yield None
        yield EndOfStream(stream_id="cam0", frames=self.frames, reason="eof")


class SlowSink(Node):
    """Takes ``work_s`` per frame and remembers what it got."""

    name = "encoder"
    inputs = (FrameMessage,)

    def __init__(self, work_s: float, ready: threading.Event) -> None:
        super().__init__()
        self.work_s = work_s
        self.ready = ready
        self.seqs: list[int] = []
        self.ends: list[EndOfStream] = []
        self.aborted = False

    def setup(self) -> None:
        self.ready.set()  # the input is bound and its inbox drains by now

    def process(self, msg: Message) -> list[Message]:
        assert isinstance(msg, FrameMessage)
        self.seqs.append(msg.meta.seq)
        time.sleep(self.work_s)
        return []

    def finish(self, end: EndOfStream) -> list[Message]:
        self.ends.append(end)
        return []

    def abort(self) -> None:
        self.aborted = True


def run_in_thread(runner: NodeRunner) -> tuple[threading.Thread, list[int]]:
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(runner.run()), daemon=True)
    thread.start()
    return thread, codes


def test_live_runner_newest_frame_wins(ctx: zmq.Context) -> None:
    frames_sent, interval_s, work_s = 60, 0.005, 0.05
    endpoint = "inproc://live-frames"
    ready = threading.Event()
    sink = SlowSink(work_s, ready)
    source = BurstSource(frames_sent, interval_s, ready)
    sink_runner = NodeRunner(sink, NodeEndpoints(input=endpoint), context=ctx, live=True)
    source_runner = NodeRunner(source, NodeEndpoints(output=endpoint), context=ctx, live=True)
    sink_thread, sink_codes = run_in_thread(sink_runner)  # consumers first: input bound
    source_thread, source_codes = run_in_thread(source_runner)
    source_thread.join(60.0)
    sink_thread.join(60.0)
    assert not source_thread.is_alive() and not sink_thread.is_alive()
    assert source_codes == [0] and sink_codes == [0]

    seqs, counters = sink.seqs, sink.counters
    assert sink.ends == [EndOfStream(stream_id="cam0", frames=frames_sent, reason="eof")]
    assert not sink.aborted
    assert source.counters.get("output_dropped", 0) == 0  # the inbox kept up
    # The slow node worked on far fewer frames than were sent, always newer ones...
    assert 2 <= len(seqs) <= frames_sent // 3, seqs
    assert all(b > a for a, b in itertools.pairwise(seqs)), seqs
    # ...and the newest one last: the final frame is never replaced by the end marker.
    assert seqs[-1] == frames_sent - 1
    # Every frame sent was either processed or replaced, and the counters say which.
    assert counters["frames_in"] == len(seqs)
    assert counters["dropped_newest_wins"] + counters["frames_in"] == frames_sent
    assert counters.get("input_gaps", 0) == seqs[-1] - seqs[0] - (len(seqs) - 1)
    assert counters.get("input_gaps", 0) == counters["dropped_newest_wins"] - seqs[0]
    assert sink.stats()["messages"] == len(seqs)
    # Live delivery never queued work up: the slow node's few frames above (not all of
    # them, one after another) are the proof, with no clock involved.
    assert inbox_threads() == 0


def test_live_runner_stops_on_request_and_closes_its_inbox(ctx: zmq.Context) -> None:
    ready = threading.Event()
    sink = SlowSink(0.0, ready)
    stop = threading.Event()
    runner = NodeRunner(
        sink, NodeEndpoints(input="inproc://live-stop"), context=ctx, live=True, stop=stop
    )
    thread, codes = run_in_thread(runner)
    assert ready.wait(5.0)
    assert inbox_threads() == 1
    stop.set()
    thread.join(5.0)
    assert not thread.is_alive()
    assert codes == [0] and sink.aborted and sink.seqs == []
    assert inbox_threads() == 0


def test_live_middle_node_never_blocks_on_a_missing_consumer(ctx: zmq.Context) -> None:
    # Nobody reads the relay's output: lossless mode would block once the queue is full;
    # live mode drops (and counts) instead and still passes the end on.

    class Relay(Node):
        name = "tracker"
        inputs = outputs = (FrameMessage,)

        def process(self, msg: Message) -> list[Message]:
            return [msg]

    relay = Relay()
    ready = threading.Event()
    relay_runner = NodeRunner(
        relay,
        NodeEndpoints(input="inproc://relay-in", output="inproc://relay-out"),
        context=ctx,
        live=True,
        hwm=2,
    )
    source = BurstSource(40, 0.002, ready)
    source_runner = NodeRunner(
        source, NodeEndpoints(output="inproc://relay-in"), context=ctx, live=True
    )
    # A bound PULL socket that never reads: the relay's output connects and fills it.
    dead_end = open_socket(
        ctx, zmq.PULL, "inproc://relay-out", bind=True, options=SocketOptions(sndhwm=2, rcvhwm=2)
    )
    relay_thread, relay_codes = run_in_thread(relay_runner)
    source_thread, source_codes = run_in_thread(source_runner)
    ready.set()
    source_thread.join(20.0)
    wait_for(
        lambda: (
            relay.counters.get("frames_in", 0) + relay.counters.get("dropped_newest_wins", 0) >= 40
        ),
        10.0,
        f"the relay to see every frame: {relay.counters} {source.counters}",
    )
    assert source_codes == [0]
    assert relay.counters["output_dropped"] >= 1  # the full output dropped frames...
    assert relay.counters["frames_in"] + relay.counters.get("dropped_newest_wins", 0) == 40
    # ...and the end of the stream waits for room: read it out, then the relay finishes.
    received: list[Message] = []
    receiver = MessageReceiver(dead_end)
    deadline = time.monotonic() + 10.0
    while not any(isinstance(m, EndOfStream) for m in received):
        assert time.monotonic() < deadline, "no end of stream from the relay"
        msg = receiver.recv(100)
        if msg is not None:
            received.append(msg)
    relay_thread.join(5.0)
    assert relay_codes == [0]
    frames_out = [m.meta.seq for m in received if isinstance(m, FrameMessage)]
    assert len(frames_out) + relay.counters["output_dropped"] == relay.counters["frames_in"]
    assert frames_out == sorted(frames_out)
    dead_end.close(linger=0)


def test_node_processes_get_a_torch_thread_budget() -> None:
    cores = len(os.sched_getaffinity(0))
    config = RunConfig()
    assert node_environment("encoder", config)["OMP_NUM_THREADS"] == str(cores)
    assert node_environment("tracker", config)["OMP_NUM_THREADS"] == str(max(1, cores // 4))
    assert node_environment("decoder", config).get("OMP_NUM_THREADS") == os.environ.get(
        "OMP_NUM_THREADS"
    )
    chosen = config_from_dict({"encoder": {"threads": 3}, "tracker": {"threads": 2}})
    assert node_environment("encoder", chosen)["OMP_NUM_THREADS"] == "3"
    assert node_environment("tracker", chosen)["OMP_NUM_THREADS"] == "2"


def test_steady_fps_is_the_rate_after_the_backlog(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run whose slow stage started late: 12 frames come out every 0.05 s (the backlog
    queued meanwhile), then 8 at the pipeline's own 2 frames/s. The steady rate is the
    latter; the average from the first frame would say 4.2."""
    clock = iter([100 + 0.05 * i for i in range(12)] + [100.55 + 0.5 * i for i in range(1, 9)])
    monkeypatch.setattr("pipeline.run.live.time.time", lambda: next(clock))
    timings = FrameTimings(budget_ms=400)
    assert timings.steady_fps() is None
    for _ in range(20):
        timings.add({"encoder": 10.0})
    assert timings.steady_fps() == pytest.approx(2.0)
    summary = timings.summary()
    assert summary["steady_fps"] == pytest.approx(2.0)
    assert (20 - 1) / (summary["last_time"] - summary["first_time"]) == pytest.approx(19 / 4.55)
