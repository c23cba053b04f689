"""The pipeline's graph, declared once: which nodes exist, which class each is, and which
transport endpoints link them, and how the supervisor treats each (spares, threads, what
its death means). The supervisor, the CLI (``samstream node``'s choices, its exposure
warnings) and the run summary all read this table: no other code names a node.

::

    decoder --frames--> encoder --embeddings--> tracker --masks--> publisher --publish--> you
                                                   ^ control (prompt commands, REQ/REP)

Each link is a transport key (``TransportConfig`` field): the consumer binds it (PULL), the
producer connects (PUSH); ``control`` and ``publish`` are bound by their node. Importing
this module imports no node: a node's module (and its torch) loads only when it is built.
"""

from __future__ import annotations

import importlib
import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.config import RunConfig
    from pipeline.run.handoff import NodeRuntime
    from pipeline.run.runtime import Node, NodeEndpoints


@dataclass(frozen=True)
class NodeSpec:
    """One node of the graph.

    node: ``module:Class`` of its `pipeline.run.runtime.Node` (its `from_config` reads its own
    RunConfig section); input / output: the transport keys it binds and reads / connects
    and writes; control / publish: the keys of its prompt socket and of the consumers' feed
    (the node that publishes is the run's sink: the frames out, the outputs, and the feed
    that the others' statuses are relayed to).

    Supervision: ``spare``: a live run keeps a process of it started ahead with its imports
    done (torch and the rest: 2-5 s on a CPU, most of a cold restart), so that a restart
    only loads the model; ``thread_share``: the share of the cores its torch may use (None:
    not a torch node), unless its section sets ``threads``. A live run restarts a dead node
    alone; its sink's death with outputs ends the run (the files it was writing died with
    it). An offline run restarts every node from the outputs written so far.
    """

    name: str
    node: str
    input: str | None = None
    output: str | None = None
    control: str | None = None
    publish: str | None = None
    spare: bool = False
    thread_share: float | None = None

    @property
    def binds(self) -> tuple[str, ...]:
        """The transport keys this node binds (where a remote peer would reach it)."""
        return tuple(k for k in (self.input, self.control, self.publish) if k)


GRAPH: tuple[NodeSpec, ...] = (
    NodeSpec("decoder", "nodes.decoder:DecoderNode", output="frames"),
    # On 2 cores an encoder and a tracker with 2 threads each made a live run's p95 latency
    # about twice what it is with 2 and 1: the encoder, the heavy stage, gets every core,
    # the tracker's small per-frame work a quarter of them.
    NodeSpec(
        "encoder",
        "nodes.encoder:EncoderNode",
        input="frames",
        output="embeddings",
        spare=True,
        thread_share=1.0,
    ),
    NodeSpec(
        "tracker",
        "nodes.tracker:TrackerNode",
        input="embeddings",
        output="masks",
        control="control",
        spare=True,
        thread_share=0.25,
    ),
    NodeSpec("publisher", "nodes.publisher:PublisherNode", input="masks", publish="publish"),
)

NODE_NAMES: tuple[str, ...] = tuple(spec.name for spec in GRAPH)
SOURCE: NodeSpec = next(spec for spec in GRAPH if spec.input is None)  # frames in
SINK: NodeSpec = next(spec for spec in GRAPH if spec.publish is not None)  # frames out, feed


def node_spec(name: str) -> NodeSpec:
    for spec in GRAPH:
        if spec.name == name:
            return spec
    raise ValueError(f"unknown node {name!r}: one of {', '.join(NODE_NAMES)}")


def links() -> list[tuple[str, str]]:
    """(producer, consumer) of every data link, in stream order."""
    return [
        (up.name, down.name)
        for up, down in itertools.product(GRAPH, GRAPH)
        if up.output is not None and up.output == down.input
    ]


def node_class(name: str) -> type[Node]:
    """The node's class (its module imported now, not before)."""
    module, _, cls = node_spec(name).node.partition(":")
    return getattr(importlib.import_module(module), cls)


def node_endpoints(name: str, config: RunConfig) -> NodeEndpoints:
    """Where the node's sockets go, from the run's transport section."""
    from pipeline.run.runtime import NodeEndpoints

    spec, transport = node_spec(name), config.transport

    def endpoint(key: str | None) -> str | None:
        return None if key is None else getattr(transport, key)

    return NodeEndpoints(
        input=endpoint(spec.input),
        output=endpoint(spec.output),
        control=endpoint(spec.control),
        publish=endpoint(spec.publish),
        status=transport.status or None,
    )


def build_node(name: str, config: RunConfig, runtime: NodeRuntime) -> Node:
    """The node object, from a resolved run config (`pipeline.run.live.resolve_run_config`)
    and what the launcher handed it; nothing heavy happens until its setup() runs."""
    return node_class(name).from_config(config, runtime)
