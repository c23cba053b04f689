"""Where MobileSAM weights come from: an explicit path, $SAMSTREAM_WEIGHTS, the cache, a download.

A download goes to a temporary file in the cache, which is renamed into place only when
complete, so an interrupted download never leaves a truncated `mobile_sam.pt` behind.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger(__name__)

WEIGHTS_NAME = "mobile_sam.pt"
WEIGHTS_URL = "https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt"
DOWNLOAD_TIMEOUT_S = 10.0


class WeightsUnavailableError(RuntimeError):
    """No local weights and the download failed; the message says how to pass a file."""


def cache_dir() -> Path:
    """$SAMSTREAM_CACHE, else $XDG_CACHE_HOME/samstream, else ~/.cache/samstream."""
    if env := os.environ.get("SAMSTREAM_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "samstream"


def resolve_weights(
    weights: str | os.PathLike[str] | None = None,
    *,
    url: str | None = None,
    timeout_s: float = DOWNLOAD_TIMEOUT_S,
) -> Path:
    """Find the checkpoint to load.

    A ``weights`` path (one with a folder, or any name but the bare official one) must name
    an existing file. The bare name ``mobile_sam.pt`` (or None) means "the official weights,
    wherever they are", looked up in order: $SAMSTREAM_WEIGHTS; the cached ``mobile_sam.pt``;
    a ``mobile_sam.pt`` in the current folder; else a download from ``url``
    ($SAMSTREAM_WEIGHTS_URL, else the official URL) into the cache. The file found is logged.
    """
    if weights is not None and str(weights) != WEIGHTS_NAME:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"checkpoint {path} does not exist; pass the path of an existing mobile_sam.pt"
            )
        return path
    if env := os.environ.get("SAMSTREAM_WEIGHTS"):
        path = Path(env).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"SAMSTREAM_WEIGHTS={env} does not name an existing file")
        log.info("weights: %s (from $SAMSTREAM_WEIGHTS)", path)
        return path
    cached = cache_dir() / WEIGHTS_NAME
    for found in (cached, Path(WEIGHTS_NAME)):
        if found.is_file():
            log.info("weights: %s", found.resolve())
            return found
    url = url or os.environ.get("SAMSTREAM_WEIGHTS_URL") or WEIGHTS_URL
    return download_weights(url, cached, timeout_s=timeout_s)


def download_weights(url: str, dest: Path, *, timeout_s: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """Download `url` to `dest` through a temporary file, logging the SHA-256."""
    hint = (
        f"download the file elsewhere and pass it with --weights PATH, set "
        f"SAMSTREAM_WEIGHTS=PATH, or copy it to {dest}"
    )
    dest.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading MobileSAM weights from %s to %s", url, dest)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                # The timeout bounds the connection and every read: offline fails fast.
                with urllib.request.urlopen(url, timeout=timeout_s) as response:
                    total = int(response.headers.get("Content-Length") or 0) or None
                    with tqdm(
                        total=total, unit="B", unit_scale=True, desc=dest.name, leave=False
                    ) as bar:
                        while chunk := response.read(1 << 20):
                            out.write(chunk)
                            digest.update(chunk)
                            bar.update(len(chunk))
                    if total is not None and out.tell() != total:
                        raise WeightsUnavailableError(
                            f"download of {url} ended after {out.tell()} of {total} bytes; {hint}"
                        )
            except (urllib.error.URLError, OSError, ValueError) as err:
                reason = getattr(err, "reason", err)
                raise WeightsUnavailableError(
                    f"could not download MobileSAM weights from {url} ({reason}); {hint}"
                ) from err
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("saved %s (sha256 %s)", dest, digest.hexdigest())
    return dest
