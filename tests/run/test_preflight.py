"""Preflight's endpoint checks, made before any node starts: no torch, no subprocess."""

from __future__ import annotations

import re

import pytest
import zmq

from pipeline.config import config_from_dict
from pipeline.run.preflight import PreflightError, check_binds
from tests.support.e2e import free_port


def _transport(**keys: str):
    return config_from_dict({"transport": keys})


def test_every_bound_tcp_endpoint_is_checked() -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    holder = zmq.Context.instance().socket(zmq.REP)
    holder.bind(endpoint)
    try:
        for key in ("control", "publish", "frames", "status"):
            with pytest.raises(
                PreflightError, match=re.escape(f"transport.{key} {endpoint} cannot be bound")
            ):
                check_binds(_transport(**{key: endpoint}))
    finally:
        holder.close(linger=0)
    check_binds(_transport(control=f"tcp://127.0.0.1:{free_port()}"))  # free: nothing to say


def test_one_endpoint_for_two_keys_is_refused() -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with pytest.raises(PreflightError, match=r"transport\.control and transport\.publish are both"):
        check_binds(_transport(control=endpoint, publish=endpoint))


def test_endpoints_the_run_does_not_bind_are_left_alone() -> None:
    # ipc links and "auto" are the launcher's to choose; the decoder's output is connected.
    check_binds(_transport(publish="auto", control="ipc:///tmp/samstream-x/control"))
