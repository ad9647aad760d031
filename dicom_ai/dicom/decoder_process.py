"""A child process for the decoder that can end the process it runs in.

GDCM, the only installed decoder of JPEG Lossless (the GPL pylibjpeg-libjpeg is deliberately
absent), aborts on some malformed codestreams: it throws a C++ exception nothing catches, and
``std::terminate`` ends the process (found by the reader fuzz of ``tests/robustness``). In the
service that is the analysis worker, whose study then fails after ``worker.max_attempts``; in a
replay it is the whole run. Decoded here, in a child process, an abort costs one file: the
parent refuses that file with a :class:`~dicom_ai.dicom.errors.PixelDecodeError` that says what
happened, and the next request starts a fresh child.

The child is started on the first request and then serves its parent, one request at a time,
until the parent closes the pipe or dies. A request names a file and a frame; the child
acknowledges it with one byte, so that a death before it is told from a death in the decode (the
first costs no file: the request goes to a fresh child). The reply is a JSON header (dtype,
shape, photometric interpretation, or the reason the file cannot be decoded) followed by the
array's bytes, read straight into the parent's array. The child's stderr goes to a temporary
file that the parent reads only to give an abort's reason, with any quoted value taken out.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import resource
import selectors
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt

from dicom_ai.dicom.errors import DicomInputError, PixelDecodeError
from dicom_ai.logs import redact_values

log = logging.getLogger(__name__)

#: The pydicom decoding plugins that run in the child process.
ISOLATED_PLUGINS = frozenset({"gdcm"})

_MODULE = "dicom_ai.dicom.decoder_process"
_LENGTH = struct.Struct(">I")
#: The child's first byte of every reply: it has the request, so a death from here on is the
#: decode's.
_ACK = b"\x06"
#: Longest reason taken from the child's stderr.
_MAX_REASON = 300


class DecoderProcess:
    """The child process and the pipes to it; one request at a time (a lock serialises
    threads)."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None
        self._lock = threading.Lock()

    def decode(self, path: Path, index: int | None, *, timeout_s: float
               ) -> tuple[npt.NDArray[Any], str]:
        """:func:`dicom_ai.dicom.pixels.decode_file` of ``path``, in the child process.

        Parameters
        ----------
        path:
            The file, its header checked by :func:`dicom_ai.dicom.pixels.decode_pixels`.
        index:
            0-based frame, or None for every frame.
        timeout_s:
            How long the decode may take; past it the child is killed.

        Returns
        -------
        tuple
            The stored values and their photometric interpretation.

        Raises
        ------
        PixelDecodeError
            As for :func:`~dicom_ai.dicom.pixels.decode_file`, or the decoder ended the child
            process or ran past ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        with self._lock:
            proc = self._taken({"path": str(path), "index": index}, path, timeout_s, deadline)
            assert proc.stdout is not None
            if not _readable(proc.stdout, deadline - time.monotonic()):
                raise self._timed_out(timeout_s, path)
            header = _receive(proc.stdout)
            if header is None:
                raise PixelDecodeError(self._died_decoding(), path=path)
            if "reason" in header:
                raise PixelDecodeError(str(header["reason"]), path=path)
            array: npt.NDArray[Any] = np.empty(header["shape"], dtype=np.dtype(header["dtype"]))
            if not _read_into(proc.stdout, array.reshape(-1).view(np.uint8).data):
                raise PixelDecodeError(self._died_decoding(), path=path)
            return array, str(header["photometric"])

    def _taken(self, request: dict[str, Any], path: Path, timeout_s: float, deadline: float
               ) -> subprocess.Popen[bytes]:
        """A child that has acknowledged ``request``.

        A child can end between two files (killed by an operator or the kernel's OOM killer)
        after :meth:`_running` found it alive; such a death is not the file's doing, so it is
        told apart by the acknowledgement and one fresh child is tried before the file is
        refused.
        """
        for attempt in (1, 2):
            proc = self._running()
            assert proc.stdin is not None and proc.stdout is not None
            try:
                _send(proc.stdin, request)
            except BrokenPipeError:
                pass
            else:
                if not _readable(proc.stdout, deadline - time.monotonic()):
                    raise self._timed_out(timeout_s, path)
                # Read past the buffer, which is empty between replies: the header that
                # follows must stay in the pipe for the next select.
                if os.read(proc.stdout.fileno(), 1) == _ACK:
                    return proc
            how, said = self._ended()
            if attempt == 1:
                log.warning("decoder process %s before it took a request; starting a fresh "
                            "one", how)
        raise PixelDecodeError(f"the decoder process {how} before it could take the file, "
                               f"twice{said}", path=path)

    def _timed_out(self, timeout_s: float, path: Path) -> PixelDecodeError:
        self._stop(kill=True)
        log.warning("decoder process stopped after %g s (limits.isolated_decode_timeout_s)",
                    timeout_s)
        return PixelDecodeError(
            f"decoding took longer than limits.isolated_decode_timeout_s ({timeout_s:g} s); "
            "the decoder process was stopped", path=path)

    @property
    def pid(self) -> int | None:
        """The child's process ID; None before the first request and after :meth:`close`."""
        return self._proc.pid if self._proc is not None else None

    def close(self) -> None:
        """End the child process (it exits when its pipe closes; killed if it does not)."""
        with self._lock:
            self._stop(kill=False)

    def _running(self) -> subprocess.Popen[bytes]:
        if self._proc is not None and self._proc.poll() is None:
            assert self._stderr is not None
            self._stderr.seek(0)
            self._stderr.truncate()
            return self._proc
        self._stop(kill=True)
        # Open for as long as the child runs; _stop closes it.
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115
        # The parent's own import path, so that a source checkout works like an installed one.
        package_root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (package_root, os.environ.get("PYTHONPATH", "")) if p)}
        self._proc = subprocess.Popen(
            [sys.executable, "-m", _MODULE, str(os.getpid())], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self._stderr, env=env, close_fds=True)
        return self._proc

    def _died_decoding(self) -> str:
        """The reason of a file whose decode ended the child."""
        how, said = self._ended()
        log.warning("decoder process %s; a fresh one decodes the next file", how)
        return f"the decoder process {how} while decoding the image{said}"

    def _ended(self) -> tuple[str, str]:
        """How the child ended ("was killed by SIGABRT") and ": " + the last line it printed,
        values redacted (or ""), once it is stopped."""
        assert self._proc is not None and self._stderr is not None
        code = _reap(self._proc)
        how = f"was killed by {_signal_name(-code)}" if code < 0 else f"exited with code {code}"
        self._stderr.seek(0)
        lines = [line.strip() for line in self._stderr.read().decode("utf-8", "replace")
                 .splitlines() if line.strip()]
        self._stop(kill=True)
        return how, f": {redact_values(lines[-1])[:_MAX_REASON]}" if lines else ""

    def _stop(self, *, kill: bool) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if kill:
                proc.kill()
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    # A request the child never read is still buffered: closing flushes it
                    # into a pipe with no reader (the file descriptor is closed all the same).
                    with contextlib.suppress(BrokenPipeError):
                        stream.close()
            _reap(proc)
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None


_CHILD = DecoderProcess()
atexit.register(_CHILD.close)


def stop() -> None:
    """End this process's decoder process, if running; the next decode starts another."""
    _CHILD.close()


def pid() -> int | None:
    """This process's decoder process's ID, None when none has been started."""
    return _CHILD.pid


def decode_in_child(path: Path, index: int | None, *, timeout_s: float
                    ) -> tuple[npt.NDArray[Any], str]:
    """:meth:`DecoderProcess.decode` with this process's one child process."""
    return _CHILD.decode(path, index, timeout_s=timeout_s)


def _reap(proc: subprocess.Popen[bytes]) -> int:
    """The child's exit status, once it has ended (killed if it has not within 5 s)."""
    try:
        return proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _send(stream: IO[bytes], message: dict[str, Any]) -> None:
    data = json.dumps(message).encode()
    stream.write(_LENGTH.pack(len(data)) + data)
    stream.flush()


def _receive(stream: IO[bytes]) -> dict[str, Any] | None:
    """The next message, or None when the other side has gone."""
    prefix = stream.read(_LENGTH.size)
    if len(prefix) < _LENGTH.size:
        return None
    (length,) = _LENGTH.unpack(prefix)
    data = stream.read(length)
    if len(data) < length:
        return None
    message: dict[str, Any] = json.loads(data)
    return message


def _read_into(stream: IO[bytes], buffer: memoryview) -> bool:
    """Fill ``buffer`` from ``stream``; False when the stream ends first."""
    filled = 0
    while filled < len(buffer):
        count = stream.readinto(buffer[filled:])  # type: ignore[attr-defined]
        if not count:
            return False
        filled += count
    return True


def _readable(stream: IO[bytes], timeout_s: float) -> bool:
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        return bool(selector.select(timeout_s))


def serve(requests: IO[bytes], replies: IO[bytes]) -> None:
    """The child's loop: decode each request until ``requests`` ends."""
    # Imported here: pixels imports this module for the parent's side.
    from dicom_ai.dicom import pixels

    while (request := _receive(requests)) is not None:
        replies.write(_ACK)
        replies.flush()
        try:
            decoded = pixels.decode_file(Path(request["path"]), index=request["index"],
                                         in_decoder_process=True)
        except DicomInputError as exc:
            _send(replies, {"reason": exc.reason})
            continue
        array = np.ascontiguousarray(decoded.array)
        _send(replies, {"dtype": array.dtype.str, "shape": list(array.shape),
                        "photometric": decoded.photometric_interpretation})
        replies.write(array.reshape(-1).view(np.uint8).data)
        replies.flush()


def main(argv: list[str]) -> None:
    """Entry point of the child: ``python -m dicom_ai.dicom.decoder_process PARENT_PID``."""
    # The service ties its own children to it the same way; imported here, in the child only,
    # so that reading DICOM does not import the service.
    from dicom_ai.service.process import die_with_parent

    die_with_parent(int(argv[0]))
    # A Ctrl-C in the terminal reaches the whole process group; the parent decides what it
    # means, and the child ends with it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # An abort would otherwise leave a core dump, and this process's memory holds the file.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # Replies go on a private copy of stdout; the decoders' own prints to fd 1 go to stderr.
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    serve(sys.stdin.buffer, replies)


if __name__ == "__main__":
    main(sys.argv[1:])
