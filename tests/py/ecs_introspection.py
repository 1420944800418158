"""A stand-in for the ECS container agent's introspection API: `ecs_introspection.py TASKS_FILE`.

Answers `GET /v1/tasks?dockerid=ID` with the task of TASKS_FILE (a JSON object, Docker id → task
in the agent's shape: Arn, DesiredStatus, KnownStatus, Family, Version, Containers[DockerId,
DockerName, Name]) read afresh on each request, and 404 for an id it does not hold, as the ECS
agent does. Binds port 0 on loopback and prints `introspection listening on 127.0.0.1:PORT`.
"""

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

TASKS = sys.argv[1]


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        url = urlparse(self.path)
        ids = parse_qs(url.query).get("dockerid", [])
        with open(TASKS) as f:
            tasks = json.load(f)
        if url.path != "/v1/tasks" or len(ids) != 1 or ids[0] not in tasks:
            self.send_response(404)
            self.end_headers()
            return
        body = json.dumps(tasks[ids[0]]).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        sys.stderr.write("introspection: " + (fmt % args) + "\n")


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print("introspection listening on 127.0.0.1:%d" % server.server_address[1], flush=True)
server.serve_forever()
