"""Opening shards with bounded retries: a remote shard that cannot be read fails after a known number of attempts
with an error naming its URL, instead of WebDataset's curl retries (30 per open, up to 30 s each) repeated for
every one of a thousand consecutive read errors (about 17 hours for one unreachable URL).

Local files open as before (a missing file is not transient: it is counted by the caller). ``http(s)://``,
``sftp://``, ``ftps://`` and ``scp://`` URLs are fetched with ``curl`` without its own retries, aborting a
connection that does not answer within ``timeout_s`` or stalls for ``timeout_s``; ``pipe:`` commands and other
WebDataset schemes open through ``webdataset.gopen``. An open counts as failed when the first block cannot be read
(the command or curl exits with an error before sending data); it is retried ``retries`` times, ``delay_s``
seconds apart, then `ShardUnreachableError` is raised.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from webdataset.gopen import Pipe, gopen

__all__ = ["ShardRetry", "ShardUnreachableError", "open_shard", "open_shards"]

_CURL_SCHEMES = ("http", "https", "sftp", "ftps", "scp")
_FIRST_BLOCK = 512  # one tar header


class ShardUnreachableError(RuntimeError):
    """A shard URL could not be opened or read after every allowed attempt."""


@dataclass(frozen=True)
class ShardRetry:
    """Attempts at opening one remote shard: 1 + ``retries``, ``delay_s`` apart; ``timeout_s`` bounds curl's
    connection and any stall of a transfer."""

    retries: int = 3
    delay_s: float = 5.0
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.retries < 0 or self.delay_s < 0 or self.timeout_s <= 0:
            raise ValueError(f"shard retries / delay must be >= 0 and the timeout > 0, got {self.retries}, "
                             f"{self.delay_s} and {self.timeout_s}")


def is_local(url: str) -> bool:
    scheme = urlparse(url).scheme
    return url.startswith("file:") or scheme == "" or (len(scheme) == 1 and url[1:3] in (":\\", ":/"))


class _Prefixed:
    """A read stream that first returns ``head`` (already read from ``stream``), then the rest of ``stream``."""

    def __init__(self, head: bytes, stream: Any) -> None:
        self._head, self._stream = head, stream

    def read(self, size: int = -1) -> bytes:
        if not self._head:
            return self._stream.read(size)
        if size is None or size < 0:
            head, self._head = self._head, b""
            return head + self._stream.read()
        head, self._head = self._head[:size], self._head[size:]
        if len(head) < size:
            head += self._stream.read(size - len(head))
        return head

    def close(self) -> None:
        self._stream.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _open_once(url: str, timeout_s: float) -> Any:
    if urlparse(url).scheme in _CURL_SCHEMES:
        seconds = str(max(1, round(timeout_s)))
        return Pipe(["curl", "--connect-timeout", seconds, "--speed-limit", "1", "--speed-time", seconds,
                           "-f", "-s", "-L", url], mode="rb", bufsize=8192, ignore_status=[141, 23])
    return gopen(url, "rb")


def _close_quietly(stream: Any) -> None:
    try:
        stream.close()
    except Exception:  # the stream already failed; its error is the one reported
        pass


def open_shard(url: str, retry: ShardRetry = ShardRetry(), sleep: Callable[[float], None] = time.sleep) -> Any:
    """Open ``url`` for reading (a file object or a stream with ``read`` / ``close``). Local paths open once (their
    errors propagate); remote ones are retried per ``retry`` and raise `ShardUnreachableError` naming the URL."""
    if is_local(url):
        return gopen(url, "rb")
    attempts = retry.retries + 1
    last: Exception | None = None
    for attempt in range(attempts):
        if attempt:
            sleep(retry.delay_s)
        stream = None
        try:
            stream = _open_once(url, retry.timeout_s)
            head = stream.read(_FIRST_BLOCK)
            if len(head) < _FIRST_BLOCK and callable(getattr(stream, "wait_for_child", None)):
                stream.wait_for_child()  # the command ended early: raises when it failed
            return _Prefixed(head, stream)
        except Exception as exn:
            last = exn
            if stream is not None:
                _close_quietly(stream)
    raise ShardUnreachableError(
        f"shard {url} could not be read after {attempts} attempts {retry.delay_s:g} s apart (last error: "
        f"{str(last)[:300]}); check the URL and the network, or remove the shard from the data URLs (data "
        "shard_retries / shard_retry_delay / shard_timeout set the attempts)"
    ) from last


def open_shards(shards: Iterable[dict], retry: ShardRetry, handler: Callable[[Exception], bool]) -> Iterator[dict]:
    """``{"url": ...}`` items -> the same items with an open ``"stream"`` (WebDataset's ``url_opener`` contract).
    Local open errors go to ``handler`` (True: skip the shard, False: stop); `ShardUnreachableError` propagates."""
    for item in shards:
        url = item["url"]
        try:
            stream = open_shard(url, retry)
        except ShardUnreachableError:
            raise
        except Exception as exn:
            exn.args = exn.args + (url,)
            if handler(exn):
                continue
            break
        yield {**item, "stream": stream}
