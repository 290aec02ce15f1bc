"""One delivery attempt: a POST to the vetted address, with a short timeout, no redirects, the response unread.

``http.client`` connects to the address ``AddressPolicy.vet`` checked (never resolving the host again) and sends
the host's name in ``Host`` (and, over TLS, as the server name the certificate is checked against). A redirect is
an answer like any other non-2xx one: it is not followed, so a receiver cannot send graft elsewhere.
"""

import http.client
import socket
import ssl
import threading

from service.errors import reason
from service.webhooks.addresses import Target

MAX_RESPONSE_BYTES = 1024  # read of a response body, at most: its status is what counts
USER_AGENT = "graft-webhooks/1"


class _PinnedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, target: Target, timeout_s: float) -> None:
        super().__init__(target.host, target.port, timeout=timeout_s)
        self._address = target.address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, target: Target, timeout_s: float) -> None:
        super().__init__(target.host, target.port, timeout=timeout_s, context=ssl.create_default_context())
        self._address = target.address

    def connect(self) -> None:
        raw = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(raw, server_hostname=self.host)  # type: ignore[attr-defined]


def post(target: Target, body: bytes, headers: dict[str, str], timeout_s: float) -> int:
    """The response's status code; raises OSError or http.client.HTTPException when there was none.

    ``timeout_s`` bounds the whole try, not each read: a receiver that sends its answer a byte at a time has its
    socket shut when the time is up (a socket timeout alone would wait that long for every byte)."""
    kind = _PinnedHTTPSConnection if target.scheme == "https" else _PinnedHTTPConnection
    connection = kind(target, timeout_s)
    expired = threading.Event()
    deadline = threading.Timer(timeout_s, _shut, (connection, expired))
    deadline.start()
    try:
        connection.request("POST", target.path, body=body, headers={**headers, "User-Agent": USER_AGENT})
        response = connection.getresponse()
        response.read(MAX_RESPONSE_BYTES)
        status = response.status
    except (OSError, http.client.HTTPException):
        if expired.is_set():  # shut by the deadline: say so, not "connection reset"
            raise TimeoutError("the receiver did not answer in time") from None
        raise
    finally:
        deadline.cancel()
        connection.close()
    if expired.is_set():  # the answer was cut short: its status says nothing
        raise TimeoutError("the receiver did not answer in time")
    return status


def _shut(connection: http.client.HTTPConnection, expired: threading.Event) -> None:
    """Wake a read blocked on ``connection`` (closing alone would not): it fails or ends at once."""
    expired.set()
    sock = connection.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def describe(exc: BaseException) -> str:
    """What went wrong with a try, for the delivery log."""
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timed out"
    return f"{type(exc).__name__}: {reason(exc)}"
