"""moto server handling one request at a time: `moto_serial.py HOST PORT`.

PORT 0 binds a port the kernel picks and prints `moto listening on HOST:PORT`: the socket stays
bound from the start, so no other process can take the port between choosing and binding it.

moto's DynamoDB runs TransactWriteItems without a lock and, when a transaction fails, restores a copy
of the table taken when it started: two concurrent transactions can both pass one condition, or the
failing one can undo the other's committed write. DynamoDB isolates transactions; so must its
stand-in, or the tests of our conditional writes would test moto's race instead. The server stays
threaded (keep-alive connections do not block each other); only the handling is serialised.
"""

import sys
import threading

from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import make_server

app = DomainDispatcherApplication(create_backend_app)
lock = threading.Lock()


def serial(environ, start_response):
    with lock:
        return list(app(environ, start_response))


if __name__ == "__main__":
    server = make_server(
        sys.argv[1],
        int(sys.argv[2]),
        serial,
        threaded=True,
        request_handler=MotoRequestHandler,
    )
    print(f"moto listening on {sys.argv[1]}:{server.port}", flush=True)
    server.serve_forever()
