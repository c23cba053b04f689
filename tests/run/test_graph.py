"""The graph table: one declaration that the launcher, the CLI and the summary read."""

from __future__ import annotations

import msgspec
import pytest

from pipeline.config import RunConfig, TransportConfig
from pipeline.run.graph import NODE_NAMES, build_node, links, node_endpoints, node_spec
from pipeline.run.handoff import NodeRuntime
from pipeline.run.live import resolve_run_config
from pipeline.wire.messages import EmbeddingMessage, FrameMessage, MaskMessage


def test_links_follow_the_stream() -> None:
    assert NODE_NAMES == ("decoder", "encoder", "tracker", "publisher")
    assert links() == [("decoder", "encoder"), ("encoder", "tracker"), ("tracker", "publisher")]
    assert node_spec("tracker").binds == ("embeddings", "control")
    assert node_spec("publisher").binds == ("masks", "publish")
    assert node_spec("decoder").binds == ()
    with pytest.raises(ValueError, match="unknown node 'mixer': one of decoder, encoder"):
        node_spec("mixer")


def test_endpoints_come_from_the_transport_section() -> None:
    transport = TransportConfig(
        frames="ipc:///t/f",
        embeddings="ipc:///t/e",
        masks="ipc:///t/m",
        control="ipc:///t/c",
        status="ipc:///t/s",
        publish="tcp://127.0.0.1:5999",
    )
    config = msgspec.structs.replace(RunConfig(), transport=transport)
    tracker = node_endpoints("tracker", config)
    assert (tracker.input, tracker.output, tracker.control, tracker.publish) == (
        "ipc:///t/e",
        "ipc:///t/m",
        "ipc:///t/c",
        None,
    )
    assert node_endpoints("decoder", config).input is None
    assert node_endpoints("publisher", config).publish == "tcp://127.0.0.1:5999"
    assert all(node_endpoints(n, config).status == "ipc:///t/s" for n in NODE_NAMES)


def test_each_node_is_built_from_the_table_with_typed_ports() -> None:
    config = resolve_run_config(
        msgspec.structs.replace(
            RunConfig(),
            decoder=msgspec.structs.replace(RunConfig().decoder, source="lavfi:testsrc2"),
        )
    )
    nodes = {name: build_node(name, config, NodeRuntime()) for name in NODE_NAMES}
    assert {name: type(n).__name__ for name, n in nodes.items()} == {
        "decoder": "DecoderNode",
        "encoder": "EncoderNode",
        "tracker": "TrackerNode",
        "publisher": "PublisherNode",
    }
    assert nodes["decoder"].is_source and nodes["decoder"].outputs == (FrameMessage,)
    assert nodes["encoder"].inputs == (FrameMessage,)
    assert nodes["encoder"].outputs == nodes["tracker"].inputs == (EmbeddingMessage,)
    assert nodes["tracker"].outputs == nodes["publisher"].inputs == (MaskMessage,)
    # Each link's producer sends what its consumer takes.
    for up, down in links():
        assert set(nodes[up].outputs) <= set(nodes[down].inputs)
