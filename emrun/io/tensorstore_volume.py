"""Volumes read through tensorstore: N5, neuroglancer precomputed and remote zarr.

tensorstore is an optional extra (`pip install "emrun[remote]"`); without it such a path is
one line naming the extra. A `TensorstoreVolume` holds a tensorstore spec (plain JSON, so it
pickles into worker processes) whose transform already presents the axes as emrun does
(z, y, x, a channel axis first, origin 0); the store is opened once per process, on first
read, and tensorstore's reads are safe from many threads.

tensorstore aborts a process forked after it started its threads, so its volumes go only to
spawned workers (`forks_safely` in `emrun.io.opener` tells the training loader).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from types import ModuleType
from typing import Any

import numpy as np

from emrun.geometry import Roi, slices
from emrun.io.locations import is_url
from emrun.io.volume import Level, Volume, VolumeError, one_line

EXTRA = 'pip install "emrun[remote]"'
ANSWER_TIMEOUT_S = 60.0
"""How long opening waits for a metadata file before calling the store unreachable."""

# Opening asks whether a store answers at all, so it gives up after a few quick retries;
# reading chunks retries longer, since a long job meets passing network trouble.
PROBE_RETRIES = {"max_retries": 2, "initial_delay": "0.2s", "max_delay": "1s"}
READ_RETRIES = {"max_retries": 8, "initial_delay": "1s", "max_delay": "32s"}


# A transfer that stalls (a server that took the request and never answers) is given up
# after this long below 1 byte/s, then retried as READ_RETRIES says: without it a block's
# read waited forever and so did the job. The user's own settings of these win.
STALL_ENV = {"TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS": "60",
             "TENSORSTORE_CURL_LOW_SPEED_LIMIT_BYTES": "1"}


def tensorstore(what: str) -> ModuleType:
    """The tensorstore module, or a one-line VolumeError saying which extra to install.

    Sets the stall limit first: tensorstore reads it once, at its first HTTP request."""
    for name, value in STALL_ENV.items():
        os.environ.setdefault(name, value)
    try:
        import tensorstore as ts
    except ImportError:
        raise VolumeError(f"{what}: reading this format needs tensorstore: {EXTRA}") from None
    return ts


NATIVE_LOG_LINE = re.compile(rb"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ [^\]\n]*\] ")
"""A line of tensorstore's C++ (absl) log: `E1206 15:18:28.663384 8277 common-io:5] ...`."""
_QUIET = threading.RLock()
_quiet_depth = 0


@contextlib.contextmanager
def native_log_dropped(location: str) -> Iterator[None]:
    """Within it, tensorstore's C++ log lines written to stderr are dropped (anything else
    written there comes through, after). For every s3 URL the AWS library's search for
    credentials (no ~/.aws/config, no instance metadata service) printed nine ERROR lines
    before emrun's one-line message, though a public bucket needs none and a failed read is
    an exception emrun words; tensorstore offers no setting for that log (its absl flags
    --minloglevel and --stderrthreshold are not taken by parse_tensorstore_flags).
    EMRUN_DEBUG or TENSORSTORE_VERBOSE_LOGGING keeps the lines; threads take turns. Only
    for s3 `location`s: other stores log nothing there, and need neither the turns nor the
    held-back stderr."""
    global _quiet_depth
    if not location.startswith("s3://") or os.environ.get("EMRUN_DEBUG") or \
            os.environ.get("TENSORSTORE_VERBOSE_LOGGING"):
        yield
        return
    with _QUIET:
        _quiet_depth += 1
        try:
            if _quiet_depth > 1:  # the outermost one catches
                yield
            else:
                with _stderr_caught() as caught:
                    yield
                kept = [line for line in caught.splitlines(keepends=True)
                        if not NATIVE_LOG_LINE.match(line)]
                if kept:
                    os.write(2, b"".join(kept))
        finally:
            _quiet_depth -= 1


@contextlib.contextmanager
def _stderr_caught() -> Iterator[bytearray]:
    """File descriptor 2 into a temporary file (the C++ log bypasses sys.stderr); what
    came is in the yielded buffer once the block ends."""
    sys.stderr.flush()
    caught = bytearray()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all (a daemon's): nothing to keep clean
        yield caught
        return
    try:
        with tempfile.TemporaryFile() as held:
            os.dup2(held.fileno(), 2)
            try:
                yield caught
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                held.seek(0)
                caught.extend(held.read())
    finally:
        os.close(saved)


def context(ts: ModuleType, retries: dict[str, Any]) -> Any:
    """A tensorstore context with the same retry policy for every remote store kind."""
    kinds = ("http_request_retries", "gcs_request_retries", "s3_request_retries")
    return ts.Context({kind: retries for kind in kinds})


def kvstore(ts: ModuleType, location: str) -> dict[str, Any]:
    """The tensorstore key-value store spec of a local folder or a URL (as a folder)."""
    if is_url(location):  # a scheme is case-insensitive (RFC 3986), tensorstore's lower case
        scheme, sep, rest = location.partition("://")
        return ts.KvStore.Spec(f"{scheme.lower()}{sep}{rest.rstrip('/')}/").to_json()
    return {"driver": "file", "path": os.path.abspath(location) + "/"}


class MetadataReader:
    """Reads the small JSON files that describe a store (a zarr.json, an N5
    attributes.json, a precomputed info), with one-line errors for a store that does not
    answer."""

    def __init__(self, location: str) -> None:
        self.location = location.rstrip("/")
        self.ts = tensorstore(self.location)
        self.context = context(self.ts, PROBE_RETRIES)
        with native_log_dropped(self.location):
            self._store = self.ts.KvStore.open(kvstore(self.ts, self.location),
                                               context=self.context).result()

    def json(self, key: str) -> dict[str, Any] | None:
        """The JSON object stored under `key`, or None where there is nothing."""
        import json

        where = f"{self.location}/{key}"
        try:
            with native_log_dropped(self.location):
                found = self._store.read(key).result(timeout=ANSWER_TIMEOUT_S)
        except TimeoutError:
            raise VolumeError(f"{where}: no answer within {ANSWER_TIMEOUT_S:g} s") from None
        except Exception as exc:
            raise VolumeError(f"{where}: cannot be read: {one_line(exc)}") from None
        if found.state != "value":
            return None
        if bytes(found.value).lstrip()[:1] == b"<":
            raise VolumeError(f"{where}: is a web page (HTML), not JSON: the server answers "
                              "with a page (a login, an error or a catch-all index) where "
                              "the store's metadata should be")
        try:
            value = json.loads(found.value)
        except ValueError as exc:
            raise VolumeError(f"{where}: not valid JSON: {one_line(exc)}") from None
        if not isinstance(value, dict):
            raise VolumeError(f"{where}: expected a JSON object, got {type(value).__name__}")
        return value

    def open(self, spec: dict[str, Any], axes: Any) -> Any:
        """Open `spec` and return the view `axes` (a function of the store) makes of it."""
        with native_log_dropped(self.location):
            opened = self.ts.open(spec, context=self.context, read=True).result(
                timeout=ANSWER_TIMEOUT_S)
        return axes(opened)


@dataclass(frozen=True, kw_only=True)
class TensorstoreVolume(Volume):
    """A volume tensorstore reads; `spec` is the store with emrun's axes (JSON)."""

    spec: dict[str, Any] = field(hash=False)
    chunk_shape: tuple[int, ...] | None = None
    attrs: dict[str, Any] = field(default_factory=dict, hash=False)
    level_list: tuple[Level, ...] = ()
    root_attrs: dict[str, Any] = field(default_factory=dict, hash=False)  # the store's top

    @cached_property
    def _store(self) -> Any:
        ts = tensorstore(str(self))
        with native_log_dropped(str(self)):  # a worker's own context seeks credentials again
            return ts.open(self.spec, context=context(ts, READ_RETRIES), read=True).result()

    def _read(self, roi: Roi) -> np.ndarray:
        try:
            return np.asarray(self._store[slices(roi)].read().result())
        except Exception as exc:
            if forbidden(exc):
                raise VolumeError(f"{self}: reading {list(roi.offset)} + {list(roi.shape)} "
                                  f"was refused (HTTP 403): {REFUSED_CHUNK}") from exc
            raise

    @property
    def chunks(self) -> tuple[int, ...] | None:
        return self.chunk_shape

    def attributes(self) -> dict[str, Any]:
        return dict(self.attrs)

    def container_attributes(self) -> dict[str, Any]:
        return dict(self.root_attrs)

    def levels(self) -> list[Level]:
        return list(self.level_list)


def forbidden(exc: BaseException) -> bool:
    """Whether a read failed as HTTP 403 / permission denied (tensorstore says
    'PERMISSION_DENIED: ... [HTTP code 403]')."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current)
        if "PERMISSION_DENIED" in text or "HTTP code 403" in text:
            return True
        current = current.__cause__ or current.__context__
    return False


REFUSED_CHUNK = (
    "without read permission, or a chunk its writer never wrote (all fill value: zarr leaves "
    "those out) on an object store that answers 403 for a missing key where listing is not "
    "allowed, which tensorstore cannot tell from a refusal; give read and list permission "
    "(s3:ListBucket) for this store")
"""Why a remote chunk read is refused (a 403 cannot be taken as missing: it may be data)."""


def opened_volume(view: Any, metadata: dict[str, Any] | None = None,
                  **fields: Any) -> TensorstoreVolume:
    """A TensorstoreVolume of an opened tensorstore view (its axes already emrun's).
    ``metadata``: what a view opened with ``assume_metadata`` was given (a minimal spec
    leaves it out, and a worker reopening the spec needs it)."""
    shape = tuple(int(n) for n in view.shape)
    chunks = view.chunk_layout.read_chunk.shape
    spec = view.spec(minimal_spec=True).to_json()
    if metadata is not None:
        spec["metadata"] = metadata
    return TensorstoreVolume(
        shape=shape,
        dtype=np.dtype(view.dtype.numpy_dtype),
        spec=spec,
        chunk_shape=tuple(int(c) for c in chunks) if chunks is not None else None,
        **fields,
    )
