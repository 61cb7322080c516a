"""The hot path's recv and send on the socket under gevent's (nixcache.server.http.raw_socket):
gevent's private names it relies on are still there, and what a raw call cannot do (wait for
data, a closed socket) still goes through gevent."""

from __future__ import annotations

import gevent
import gevent.socket
import pytest

from nixcache.server import http


@pytest.fixture
def pair() -> tuple[gevent.socket.socket, gevent.socket.socket]:
    a, b = gevent.socket.socketpair()
    yield a, b
    a.close()
    b.close()


def test_the_raw_socket_is_gevents_own_and_non_blocking(pair) -> None:
    sock, _ = pair
    raw = http.raw_socket(sock)
    # Were gevent to rename these, the server would silently fall back to its slower wrapper.
    assert raw is not sock and raw.fileno() == sock.fileno()
    assert raw.gettimeout() == 0.0
    assert sock._read_event is not None and callable(sock._wait)


def test_a_read_waits_on_the_event_loop_until_data_arrives(pair) -> None:
    sock, peer = pair
    conn = http._Connection(sock)
    gevent.spawn_later(0.05, peer.sendall, b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\n\r\n")
    message = conn.next_message()
    assert message is not None and message.url == b"/nix-cache-info"


def test_a_read_blocked_on_a_socket_closed_by_another_greenlet_raises(pair) -> None:
    sock, _ = pair
    conn = http._Connection(sock)
    gevent.spawn_later(0.05, sock.close)  # as the idle reaper and drain close connections
    with pytest.raises(OSError):
        conn.next_message()
    gevent.sleep(0)  # gevent closes the socket under it once the waits are cancelled
    with pytest.raises(OSError):  # the raw socket was closed with it: no read of a reused fd
        conn.raw.recv(1)


def test_send_small_sends_everything_also_past_the_socket_buffer(pair) -> None:
    sock, peer = pair
    data = bytes(range(256)) * 8192  # 2 MiB: more than one send(2) takes
    received = bytearray()

    def read() -> None:
        while len(received) < len(data):
            received.extend(peer.recv(1 << 16))

    reader = gevent.spawn(read)
    http.send_small(sock, data, http.raw_socket(sock))
    reader.join(timeout=10)
    assert bytes(received) == data
