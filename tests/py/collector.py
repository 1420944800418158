"""A stand-in for a tracing or metrics collector (the X-Ray daemon, the Datadog agent, Jaeger's
Zipkin endpoint, a DogStatsD daemon): it records what arrives, decoded, one JSON line per
datagram or request, so a test can assert on the real payload Envoy sent.

  collector.py udp PORT OUT        datagrams on 127.0.0.1:PORT (X-Ray segments, DogStatsD lines)
  collector.py unix PATH OUT       datagrams on a Unix socket (DogStatsD over STATSD_SOCKET_PATH)
  collector.py http PORT OUT       HTTP requests on 0.0.0.0:PORT (Datadog traces, Zipkin spans)

Bodies are decoded by content type: msgpack (Datadog), JSON, and Zipkin's protobuf ListOfSpans
(decoded from the wire format here, field numbers from zipkin.proto).
"""
import base64
import http.server
import json
import os
import socket
import sys
import threading
import time

LOCK = threading.Lock()


def record(out, item):
    with LOCK, open(out, "a") as f:
        f.write(json.dumps(item, default=str) + "\n")


def varint(buf, i):
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return value, i


def fields(buf):
    """(field number, wire type, value) of one protobuf message."""
    i = 0
    while i < len(buf):
        key, i = varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            value, i = varint(buf, i)
        elif wire == 1:
            value, i = int.from_bytes(buf[i:i + 8], "little"), i + 8
        elif wire == 2:
            n, i = varint(buf, i)
            value, i = buf[i:i + n], i + n
        elif wire == 5:
            value, i = int.from_bytes(buf[i:i + 4], "little"), i + 4
        else:
            raise ValueError("wire type %d" % wire)
        yield num, wire, value


def zipkin_endpoint(buf):
    ep = {}
    for num, _, v in fields(buf):
        if num == 1:
            ep["serviceName"] = v.decode()
        elif num == 4:
            ep["port"] = v
    return ep


def zipkin_spans(buf):
    """zipkin.proto3 ListOfSpans, as the JSON v2 shape (ids in hex)."""
    spans = []
    for num, _, raw in fields(buf):
        if num != 1:
            continue
        span = {"tags": {}}
        for n, _, v in fields(raw):
            if n == 1:
                span["traceId"] = v.hex()
            elif n == 2:
                span["parentId"] = v.hex()
            elif n == 3:
                span["id"] = v.hex()
            elif n == 4:
                span["kind"] = ["SPAN_KIND_UNSPECIFIED", "CLIENT", "SERVER", "PRODUCER", "CONSUMER"][v]
            elif n == 5:
                span["name"] = v.decode()
            elif n == 8:
                span["localEndpoint"] = zipkin_endpoint(v)
            elif n == 11:
                entry = dict((k, val.decode()) for k, _, val in fields(v))
                span["tags"][entry.get(1, "")] = entry.get(2, "")
        spans.append(span)
    return spans


def decode(ctype, body):
    ctype = (ctype or "").split(";")[0].strip().lower()
    if ctype == "application/msgpack":
        import msgpack
        return msgpack.unpackb(body, raw=False, strict_map_key=False)
    if ctype == "application/json":
        return json.loads(body or b"null")
    if ctype == "application/x-protobuf":
        return zipkin_spans(body)
    return {"base64": base64.b64encode(body).decode()}


def serve_http(port, out):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def handle_one(self):
            if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                body = b""
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        break
                    body += self.rfile.read(size)
                    self.rfile.readline()
            else:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
            try:
                decoded = decode(self.headers.get("Content-Type"), body)
            except Exception as e:  # recorded, so the test shows what could not be read
                decoded = {"error": repr(e), "base64": base64.b64encode(body).decode()}
            record(out, {
                "kind": "http",
                "at": time.time(),
                "method": self.command,
                "path": self.path,
                "headers": {k.lower(): v for k, v in self.headers.items()},
                "body": decoded,
            })
            # The Datadog agent answers trace posts with sampling rates; others ignore the body.
            answer = b'{"rate_by_service": {}}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        do_POST = do_PUT = do_GET = handle_one

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("0.0.0.0", port), Handler)
    print("collector listening http=%d" % server.server_address[1], flush=True)
    server.serve_forever()


def serve_datagrams(sock, out, where):
    print("collector listening %s" % where, flush=True)
    while True:
        data = sock.recv(65535)
        record(out, {"kind": "datagram", "at": time.time(), "data": data.decode("utf-8", "replace")})


def main():
    mode, where, out = sys.argv[1:4]
    if mode == "http":
        serve_http(int(where), out)
    elif mode == "udp":
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", int(where)))
        serve_datagrams(sock, out, "udp=%d" % sock.getsockname()[1])
    elif mode == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(where)
        os.chmod(where, 0o666)
        serve_datagrams(sock, out, "unix=%s" % where)
    else:
        sys.exit("usage: collector.py udp|unix|http WHERE OUT")


if __name__ == "__main__":
    main()
