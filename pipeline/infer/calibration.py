"""`auto`'s calibration, the same for the image encoder and the tracker's mask decoder: which
installed backend is fastest on this machine, at this size and thread count, within the
tolerance of its precision of torch fp32; measured once and cached.

A `Calibration` says what one kind of backend is measured on (its candidates, inputs, call,
reference: ``pipeline.infer.encoder.build_encoder`` and
``pipeline.infer.mask_decoder.build_mask_decoder`` give theirs); `calibrate` measures,
`choose_backend` reads the cache or calibrates and writes it. The cache is JSON under
<cache>/calibration/, keyed (`calibration_key`) by the CPU model and flags, the input size,
the threads, the backend versions, the checkpoint's SHA-256 and the kind's own settings.
"""

from __future__ import annotations

import contextlib
import faulthandler
import hashlib
import json
import logging
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.infer.backend import BACKENDS, INSTALL, backend_version, installed, relative_error
from pipeline.infer.export import atomic_write_json, key_hash, samstream_version
from pipeline.infer.machine import cpu_facts
from pipeline.infer.timing import time_ms

log = logging.getLogger(__name__)

# A first run (the parity check and warm-up; a candidate whose first run took over
# FIRST_RUN_PRUNE_FACTOR x the best first run is not timed further), then up to
# CALIBRATION_ROUNDS interleaved timed rounds, dropping after each round a candidate slower
# than PRUNE_FACTOR x the best (it cannot win); no new round starts after
# CALIBRATION_BUDGET_S. Measured on 2 cores (the encoder): 4 s at 512 and 13 s at 1024,
# plus the first export (2 s / 4 s).
CALIBRATION_ROUNDS = 3
FIRST_RUN_PRUNE_FACTOR = 3.0
PRUNE_FACTOR = 2.0
CALIBRATION_BUDGET_S = 20.0
# 2: one format for every kind (the kind is in the key and the file name).
CALIBRATION_FORMAT = "samstream-calibration/2"


@dataclass
class Candidate:
    """One backend/precision in a calibration, and what became of it."""

    backend: str
    precision: str
    tolerance: float  # the largest relative error vs torch fp32 it may have
    skipped: str | None = None
    runner: Any = None  # the built backend (EncoderBackend, MaskDecoderBackend)
    rel_error: float | None = None  # the largest over the inputs
    first_ms: float | None = None  # the parity runs (one per input), warm-up included
    times_ms: dict[str, list[float]] = field(default_factory=dict)  # per input
    dropped: str | None = None  # why it stopped being timed: it could not win
    error: str | None = None

    @property
    def label(self) -> str:
        return f"{self.backend}/{self.precision}"

    @property
    def ok(self) -> bool:
        return (
            self.runner is not None
            and self.rel_error is not None
            and self.rel_error <= self.tolerance
        )

    def ms_at(self, name: str) -> float | None:
        times = self.times_ms.get(name)
        return round(statistics.median(times), 2) if times else None

    @property
    def ms(self) -> float | None:
        """The figure candidates are ranked by: the sum over the inputs of the median ms
        (every timed round times every input)."""
        if not self.times_ms:
            return None
        return round(sum(statistics.median(t) for t in self.times_ms.values()), 2)

    def as_dict(self, names: Sequence[str]) -> dict[str, Any]:
        row: dict[str, Any] = {"backend": self.backend, "precision": self.precision}
        if self.skipped:
            return {**row, "skipped": self.skipped}
        if self.error:
            row["error"] = self.error
        if len(names) > 1:  # one input: `ms` says it all
            row.update({f"ms_{name}": self.ms_at(name) for name in names})
        row.update(
            ms=self.ms,
            runs=len(self.times_ms.get(names[0], [])),
            first_ms=None if self.first_ms is None else round(self.first_ms, 1),
            rel_error=self.rel_error,
            tolerance=self.tolerance,
            ok=self.ok,
        )
        if self.dropped:
            row["dropped"] = self.dropped
        return row


def candidate(backend: str, precision: str, tolerance: float) -> Candidate:
    """A calibration candidate; skipped, saying how to install it, where its package is not."""
    cand = Candidate(backend, precision, tolerance)
    if not installed(backend):
        cand.skipped = f"not installed ({INSTALL[backend]})"
    return cand


@dataclass(frozen=True)
class Calibration:
    """What `auto` measures for one kind of backend (`calibrate`, `choose_backend`).

    what: its name in log lines and errors ("encoder", "tracker mask decoder"); name: its
    cache files' (``pipeline.infer.export.ENCODER``, ``DECODER``); image_size: the model's
    input size; settings: its own part of the key (`calibration_key`: dtype, tolerances,
    ...); precisions: what a cached choice may name; candidates: every candidate, skipped
    ones with why; inputs: name -> a maker of one call's input (candidates rank by the sum
    of their medians); run: (backend, input) -> the output compared with the reference's,
    and what is timed; reference: the torch fp32 backend; reference_label: the candidate
    that reference also is (reused, not built again), or None; unit: what an input's name
    counts, for the log; hint: the end of the error when no candidate passes.
    """

    what: str
    name: str
    image_size: int
    settings: dict[str, Any]
    precisions: tuple[str, ...]
    candidates: Callable[[], list[Candidate]]
    inputs: dict[str, Callable[[], Any]]
    run: Callable[[Any, Any], np.ndarray]
    reference: Callable[[], Any]
    reference_label: str | None = None
    unit: str = ""
    hint: str = ""


# (backend, precision) -> a built backend; RuntimeError / ValueError where it cannot be.
Make = Callable[[str, str], Any]


def _prune(
    alive: list[Candidate], figure: Callable[[Candidate], float], factor: float, what: str
) -> list[Candidate]:
    """The candidates within `factor` x the best `figure`; the others (they cannot win) are
    marked with why."""
    best = min(alive, key=figure)
    kept = []
    for cand in alive:
        ratio = figure(cand) / max(figure(best), 1e-9)
        if ratio <= factor:
            kept.append(cand)
        else:
            cand.dropped = f"{what} {ratio:.1f}x {best.label}'s"
    return kept


def calibrate(
    calibration: Calibration, make: Make, crash_record: Path | None = None
) -> tuple[dict[str, Any], Any]:
    """Time and parity-check every candidate of `calibration`, built by `make`, on this
    machine.

    A backend's native code can crash the process (OpenVINO did, on a CPU with AMX): with a
    `crash_record` (a file, absent when nothing crashed), a candidate whose first run ended
    in a fatal signal is skipped from then on, so a restarted node calibrates without it
    instead of dying again; one that was stopped or killed meanwhile is tried again.

    Each candidate's first run of every input is the parity check against the torch fp32
    reference (and its warm-up); the ones within tolerance and not far slower than the
    best first run are then timed in interleaved rounds, a candidate that cannot win
    dropped after each. Returns ({"choice": {"backend", "precision"}, "candidates": [rows:
    first_ms, ms (the sum over the inputs of the median of the timed runs; ms_<input> each
    where there are several), runs, rel_error vs torch fp32 (the largest over the inputs),
    tolerance, ok, dropped; or skipped, or error], "seconds": wall time, exports
    included}, the chosen backend).
    """
    cal = calibration
    start = time.perf_counter()
    inputs = {name: maker() for name, maker in cal.inputs.items()}
    candidates = cal.candidates()
    _first_runs(cal, make, candidates, inputs, crash_record)
    names = list(inputs)
    alive = [c for c in candidates if c.ok]
    if not alive:
        rows = "; ".join(f"{c.label}: {c.as_dict(names)}" for c in candidates)
        raise RuntimeError(
            f"no {cal.what} backend is installed and within tolerance of torch fp32 "
            f"({rows}){cal.hint}"
        )
    # First runs carry one-off costs (allocation, kernel selection): only a wide margin
    # rules a candidate out before it is timed.
    alive = _prune(alive, lambda c: c.first_ms, FIRST_RUN_PRUNE_FACTOR, "first run")
    deadline = start + CALIBRATION_BUDGET_S
    for _ in range(CALIBRATION_ROUNDS):
        for name, x in inputs.items():
            for cand in alive:  # interleaved, so that a burst of other load hits every one
                [ms] = time_ms(lambda c=cand, x=x: cal.run(c.runner, x))
                cand.times_ms.setdefault(name, []).append(ms)
        alive = _prune(alive, lambda c: c.ms, PRUNE_FACTOR, "timed")
        if len(alive) == 1 or time.perf_counter() > deadline:
            break
    winner = min((c for c in candidates if c.ok and c.times_ms), key=lambda c: c.ms)
    result = {
        "choice": {"backend": winner.backend, "precision": winner.precision},
        "candidates": [c.as_dict(names) for c in candidates],
        "seconds": round(time.perf_counter() - start, 2),
    }
    return result, winner.runner


def _first_runs(
    cal: Calibration,
    make: Make,
    candidates: list[Candidate],
    inputs: dict[str, Any],
    record: Path | None,
) -> None:
    """Each candidate built and run once on every input: its first_ms and its rel_error
    against the reference (or why it has none)."""
    reference = cal.reference()
    if cal.reference_label is not None:
        # Torch's very first run pays for allocations and kernel choices (2.3x its steady
        # time for the encoder at 1024), ONNX Runtime and OpenVINO pay for theirs at load:
        # warm the reference up first so that its first run, also its candidate's,
        # compares fairly.
        for x in inputs.values():
            cal.run(reference, x)
    expected, reference_ms = _run_all(cal, reference, inputs)
    crashed = _crashed(record)
    for cand in candidates:
        if cand.skipped:
            continue
        if cand.label == cal.reference_label:
            cand.runner, cand.rel_error, cand.first_ms = reference, 0.0, reference_ms
            continue
        if cand.label in crashed:
            cand.skipped = "crashed the process in an earlier calibration on this machine"
            continue
        try:
            with _crash_watch(record, crashed, cand.label):
                cand.runner = make(cand.backend, cand.precision)
                outputs, cand.first_ms = _run_all(cal, cand.runner, inputs)
            cand.rel_error = max(relative_error(outputs[n], expected[n]) for n in inputs)
        except (RuntimeError, ValueError) as err:
            # A backend that cannot load or run the model is not chosen; the run goes on.
            cand.runner, cand.error = None, str(err)
            log.warning("%s backend %s failed in calibration: %s", cal.what, cand.label, err)
        if cand.runner is not None and not cand.ok:
            log.info(
                "%s backend %s is off by %.2g (tolerance %.0e): not a candidate",
                cal.what,
                cand.label,
                cand.rel_error,
                cand.tolerance,
            )


def _run_all(
    cal: Calibration, runner: Any, inputs: dict[str, Any]
) -> tuple[dict[str, np.ndarray], float]:
    """`runner`'s outputs on every input, and the milliseconds they took together."""
    outputs: dict[str, np.ndarray] = {}
    [ms] = time_ms(lambda: outputs.update((n, cal.run(runner, x)) for n, x in inputs.items()))
    return outputs, ms


def _crashed(record: Path | None) -> list[str]:
    """The candidates that crashed the process (a fatal signal) in an earlier calibration."""
    if record is None or not record.is_file():
        return []
    try:
        head, _, trace = record.read_text(encoding="utf-8").partition("\n")
        noted = json.loads(head)
        crashed = [str(label) for label in noted["crashed"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []  # a torn record: nothing known to crash
    if noted.get("trying") and "Fatal Python error" in trace:
        # faulthandler wrote this: a fatal signal, not a stop or a kill (which retry it).
        crashed.append(str(noted["trying"]))
        log.warning("%s crashed the process in the last calibration:\n%s", crashed[-1], trace)
    if crashed:
        log.warning("skipping %s: crashed the process in an earlier calibration", crashed)
    return crashed


@contextlib.contextmanager
def _crash_watch(record: Path | None, crashed: list[str], label: str) -> Iterator[None]:
    """While candidate ``label`` runs: the record names it, and a fatal signal (SIGSEGV,
    SIGABRT, ...) appends faulthandler's traceback to it, which is what `_crashed` reads as
    a crash. After it, the record holds the crashes only (no file when there are none)."""
    if record is None:
        yield
        return
    record.parent.mkdir(parents=True, exist_ok=True)
    was_enabled = faulthandler.is_enabled()
    with open(record, "w", encoding="utf-8") as file:
        file.write(json.dumps({"crashed": crashed, "trying": label}) + "\n")
        file.flush()
        faulthandler.enable(file=file, all_threads=True)
        try:
            yield
        finally:
            faulthandler.disable()
            if was_enabled:  # on stderr again (where python -X faulthandler or pytest had it)
                with contextlib.suppress(RuntimeError, ValueError, OSError, AttributeError):
                    faulthandler.enable()
    if crashed:
        record.write_text(json.dumps({"crashed": crashed}) + "\n", encoding="utf-8")
    else:
        record.unlink(missing_ok=True)


def calibration_key(
    name: str, *, image_size: int, threads: int, checkpoint_sha256: str, **settings: Any
) -> dict[str, Any]:
    """What a calibration of kind `name` ("encoder", "decoder") depends on: another machine
    (CPU model and flags, architecture), size, thread count, backend or samstream version,
    checkpoint or setting (`settings`: the kind's dtype, tolerances, ...) calibrates again."""
    model, flags = cpu_facts()
    return {
        "format": CALIBRATION_FORMAT,
        "kind": name,
        "cpu_model": model,
        "cpu_flags_sha256": hashlib.sha256(" ".join(sorted(flags)).encode()).hexdigest(),
        "machine": platform.machine(),
        "versions": {
            **{name: backend_version(name) for name in BACKENDS[1:]},
            "samstream": samstream_version(),
        },
        "image_size": image_size,
        "threads": threads,
        "checkpoint_sha256": checkpoint_sha256,
        **settings,
    }


def load_calibration(
    path: Path, key: dict[str, Any], *, what: str, precisions: Sequence[str]
) -> dict[str, Any] | None:
    """A cached calibration of `what` ("encoder", "tracker mask decoder") for exactly `key`,
    or None: missing, made for another key (never used), or corrupt (a warning; calibrated
    again)."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        choice = data["choice"]
        if data["key"] != key:
            return None  # another machine or setting: never used
        if choice["backend"] not in BACKENDS[1:] or choice["precision"] not in precisions:
            raise ValueError(f"unknown choice {choice}")
        return data
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.warning("%s calibration cache %s is corrupt (%s): calibrating again", what, path, err)
        return None


def _measured(row: dict[str, Any]) -> str:
    """One candidate row of a calibration, for the log: its ms (per input where there are
    several), or why it has none."""
    label = f"{row['backend']}/{row['precision']}"
    if row.get("ms") is None:
        why = row.get("skipped") or row.get("error") or row.get("dropped")
        return f"{label} {why}" if why else f"{label} off by {row['rel_error']:.2g}"
    per_input = [row[k] for k in row if k.startswith("ms_")]
    return f"{label} {' + '.join(f'{ms:.0f}' for ms in per_input or [row['ms']])} ms"


def choose_backend(
    calibration: Calibration, make: Make, *, threads: int, checkpoint_sha256: str, cache: Path
) -> tuple[Any, dict[str, Any]]:
    """The backend `auto` picks for `calibration` with `threads` (the budget) and this
    checkpoint: the cached choice for its key, else a new calibration (written to `cache`);
    and the report's part that says so (chosen_by, candidates, calibration_s,
    calibration_file)."""
    cal = calibration
    key = calibration_key(
        cal.name,
        image_size=cal.image_size,
        threads=threads,
        checkpoint_sha256=checkpoint_sha256,
        **cal.settings,
    )
    path = cache / "calibration" / f"{cal.name}-{cal.image_size}-{key_hash(key)}.json"
    data = load_calibration(path, key, what=cal.what, precisions=cal.precisions)
    runner = None
    if data is not None:
        choice = data["choice"]
        try:
            runner = make(choice["backend"], choice["precision"])
            chosen_by = "calibration cache"
        except (RuntimeError, ValueError) as err:
            log.warning(
                "cached %s choice %s/%s cannot be used (%s): calibrating again",
                cal.what,
                choice["backend"],
                choice["precision"],
                err,
            )
    if runner is None:
        log.info(
            "calibrating the %s backends at %d px with %d threads (once per machine, size "
            "and version; seconds) ...",
            cal.what,
            cal.image_size,
            threads,
        )
        result, runner = calibrate(cal, make, crash_record=path.with_suffix(".crashes"))
        data = {"key": key, **result}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, data)
        chosen_by = "calibration"
    inputs = " + ".join(cal.inputs) + f" {cal.unit}: " if len(cal.inputs) > 1 else ""
    rows = ", ".join(_measured(row) for row in data["candidates"])
    log.info("%s backend auto, by %s: %s%s", cal.what, chosen_by, inputs, rows)
    return runner, {
        "chosen_by": chosen_by,
        "candidates": data["candidates"],
        "calibration_s": data["seconds"],
        "calibration_file": str(path),
    }
