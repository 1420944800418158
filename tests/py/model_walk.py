"""A test generated from botocore's App Mesh model (appmesh 2019-01-25), run against a live agent.

Part A, round trips: for every one of the model's operations, requests are built from the model
(the required members only, and "full" variants with every optional member filled; variant k picks
member k of each union, so together the variants reach every union member), sent with boto3 in
dependency order (mesh, virtual nodes, routers, services, gateways, routes of each kind, gateway
routes of each kind, tags, lists, deletes), and checked: HTTP 200, the raw body fits the output
shape (check_shape.py), and the spec a create or update returns is the spec sent, and so is the
one a describe returns afterwards.

Part B, constraints: for every constraint the model states on what an operation's input can reach
(required members, string lengths, integer ranges, list lengths, enums, unions with exactly one
member, the two patterns), a request that breaks exactly that one constraint of an otherwise valid
request must get HTTP 400, `x-amzn-ErrorType: BadRequestException`, and a message naming the field
path (`spec.listeners[3].portMapping.port`). Every model-level constraint must be exercised at
least once; the script counts them and lists every miss.

App Mesh's semantic rules (a route kind needs a router listener of its protocol, weighted targets
name existing nodes, ...) are not in the model: the few overrides they need are the
SEMANTIC_OVERRIDES table below, and nowhere else.

Usage: model_walk.py --endpoint http://127.0.0.1:PORT   (exit 0 when everything held)
"""
import argparse
import copy
import json
import os
import re
import sys
import uuid

import boto3
import botocore.session
from botocore.config import Config
from botocore.exceptions import ClientError

sys.dont_write_bytecode = True  # no __pycache__ next to the sources
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from check_shape import check as check_output_shape  # noqa: E402

MODEL = botocore.session.get_session().get_service_model("appmesh")
VERBOSE = bool(os.environ.get("MODEL_WALK_VERBOSE"))

# === The fixture world: names the generated requests refer to ===

MESH = "walk"
MESH_MIN = "walk-min"
NODE = "vn-full"  # four listeners (one per protocol): route targets, service provider
ROUTER = "vr-full"  # four listeners (one per protocol): parent of the routes
SERVICE = "vs-full.walk.local"  # the gateway routes' target
GATEWAY = "gw-full"  # three listeners (one per protocol): parent of the gateway routes

NODE_PROTOCOLS = ["http", "tcp", "http2", "grpc"]  # PortProtocol, in the model's order
GATEWAY_PROTOCOLS = ["http", "http2", "grpc"]  # VirtualGatewayPortProtocol
NODE_PORTS = {p: 8080 + i for i, p in enumerate(NODE_PROTOCOLS)}  # nodes and routers alike
GATEWAY_PORTS = {p: 9080 + i for i, p in enumerate(GATEWAY_PROTOCOLS)}
ROUTE_KIND_PROTOCOL = {"grpcRoute": "grpc", "http2Route": "http2", "httpRoute": "http", "tcpRoute": "tcp"}
ROUTE_KINDS = list(ROUTE_KIND_PROTOCOL)
GATEWAY_ROUTE_KINDS = ["grpcRoute", "http2Route", "httpRoute"]
VARIANTS = range(5)  # the largest union (HeaderMatchMethod) has five members


class Gen:
    """What one generated request is: minimal or full, its union variant, the route kind."""

    def __init__(self, full, k=0, kind=None):
        self.full = full
        self.k = k
        self.kind = kind


# === Realistic values by member name (cosmetic: any in-range value would do) ===

HINTS = {
    "hostname": lambda i: f"host-{i}.walk.local",
    "exact": lambda i: f"/exact-{i}",
    "regex": lambda i: f"/re-{i}/.*",
    "prefix": lambda i: "/",
    "suffix": lambda i: f"-sfx{i}",
    "path": lambda i: "/dev/stdout",
    "certificateArn": lambda i: f"arn:aws:acm:us-west-2:000000000000:certificate/walk-{i}",
    "certificateAuthorityArns": lambda i: f"arn:aws:acm-pca:us-west-2:000000000000:certificate-authority/ca-{i}",
    "certificateChain": lambda i: f"/certs/chain-{i}.pem",
    "privateKey": lambda i: f"/certs/key-{i}.pem",
    "secretName": lambda i: f"walk-secret-{i}",
    "namespaceName": lambda i: "walk.local",
    "serviceName": lambda i: f"walk.Service{i}",
    "methodName": lambda i: f"Get{i}",
    "name": lambda i: f"x-walk-{i}",
    "key": lambda i: f"walk-key-{i}",
    "value": lambda i: f"walk-value-{i}",
    "text": lambda i: "%START_TIME% %RESPONSE_CODE%",
    "httpRetryEvents": lambda i: ["server-error", "gateway-error"][i % 2],
    "virtualServiceName": lambda i: f"backend-{i}.walk.local",
    "clientToken": lambda i: f"walk-{uuid.uuid4()}",
    "tagKeys": lambda i: f"walk-key-{i}",
    "exact_san": lambda i: f"san-{i}.walk.local",
}

INT_HINTS = {
    "port": lambda i: 8080 + i,
    "ports": lambda i: 8080 + i,
    "weight": lambda i: 50,
    "priority": lambda i: 10 + i,
    "maxRetries": lambda i: 2,
    "maxEjectionPercent": lambda i: 10,
    "maxServerErrors": lambda i: 5,
    "healthyThreshold": lambda i: 2,
    "unhealthyThreshold": lambda i: 3,
    "intervalMillis": lambda i: 5000,
    "timeoutMillis": lambda i: 2000,
    "maxConnections": lambda i: 100,
    "maxPendingRequests": lambda i: 50,
    "maxRequests": lambda i: 100,
    "start": lambda i: 1,
    "end": lambda i: 100,
}



# === The generator ===


def gen(shape, g, member=None, index=0):
    """A valid value of `shape` (reached through `member`; `index` is the list position)."""
    t = shape.type_name
    override = SEMANTIC_OVERRIDES.get(shape.name, {})
    if "build" in override:
        return override["build"](shape, g)
    if t == "structure":
        if shape.metadata.get("union"):
            names = list(shape.members)
            pick = names[(g.k + index) % len(names)]
            value = {pick: gen(shape.members[pick], g, pick, index)}
        else:
            keep = set(shape.required_members) | set(override.get("force", ()))
            value = {
                name: gen(m, g, name, index)
                for name, m in shape.members.items()
                if g.full or name in keep
            }
        fix = override.get("fix")
        return fix(value, shape, g, index) if fix else value
    if t == "list":
        lo, hi = shape.metadata.get("min", 0), shape.metadata.get("max", 10**6)
        n = min(hi, max(lo, 2 if g.full else 1))
        return [gen(shape.member, g, member, i) for i in range(n)]
    if t == "string":
        if shape.enum:
            return shape.enum[(g.k + index) % len(shape.enum)]
        hint = HINTS.get("exact_san" if shape.name == "SubjectAlternativeName" else member)
        value = hint(index) if hint else f"walk-{member or shape.name}-{index}"
        lo, hi = shape.metadata.get("min", 0), shape.metadata.get("max", 10**6)
        value = (value + "x" * lo)[: max(lo, min(hi, len(value)))]
        pattern = shape.metadata.get("pattern")
        assert pattern is None or re.search(pattern, value), (shape.name, value)
        return value
    if t in ("integer", "long"):
        lo, hi = shape.metadata.get("min"), shape.metadata.get("max")
        hint = INT_HINTS.get(member)
        value = hint(index) if hint else 1 + index
        if lo is not None:
            value = max(lo, value)
        if hi is not None:
            value = min(hi, value)
        return value
    if t == "boolean":
        return True
    raise ValueError(f"no generator for {shape.name} ({t})")


def union_with(shape, member, g, index):
    """The union `shape` with `member` set (when a semantic rule decides which member)."""
    return {member: gen(shape.members[member], g, member, index)}


# === App Mesh's semantic rules, as overrides of the generic generator (the only ones) ===


def listeners_for(protocols, ports, base_of):
    """A list rule: one listener per protocol, each on its own port."""

    def rule(shape, g):
        protos = protocols if g.full else protocols[:1]
        out = []
        for i, proto in enumerate(protos):
            listener = gen(shape.member, g, None, i)
            listener["portMapping"] = {"port": ports[proto], "protocol": proto}
            out.append(base_of(listener, shape.member, g, i))
        return out

    return rule


def node_listener(listener, shape, g, i):
    """Connection pool and timeout members match the listener protocol; health checks are sane."""
    proto = listener["portMapping"]["protocol"]
    if "connectionPool" in listener:
        listener["connectionPool"] = union_with(shape.members["connectionPool"], proto, g, i)
    if "timeout" in listener:
        listener["timeout"] = union_with(shape.members["timeout"], proto, g, i)
    if "healthCheck" in listener:
        health_check(listener["healthCheck"], proto)
    return listener


def gateway_listener(listener, shape, g, i):
    proto = listener["portMapping"]["protocol"]
    if "connectionPool" in listener:
        listener["connectionPool"] = union_with(shape.members["connectionPool"], proto, g, i)
    if "healthCheck" in listener:
        health_check(listener["healthCheck"], proto)
    return listener


def health_check(hc, proto):
    """timeoutMillis < intervalMillis; http and http2 health checks need a path."""
    hc["protocol"] = proto
    hc["timeoutMillis"], hc["intervalMillis"] = 2000, 5000
    if proto in ("http", "http2"):
        hc["path"] = "/ping"


def route_spec(value, shape, g, index):
    """Exactly one route kind, matching the port of a router listener of its protocol."""
    kind = g.kind
    spec = {k: v for k, v in value.items() if k == "priority"}
    spec[kind] = value.get(kind) or gen(shape.members[kind], g, kind, index)
    spec[kind].setdefault("match", {})["port"] = NODE_PORTS[ROUTE_KIND_PROTOCOL[kind]]
    return spec


def gateway_route_spec(value, shape, g, index):
    """Exactly one gateway route kind, on the port of a gateway listener of its protocol."""
    kind = g.kind
    spec = {k: v for k, v in value.items() if k == "priority"}
    spec[kind] = value.get(kind) or gen(shape.members[kind], g, kind, index)
    proto = ROUTE_KIND_PROTOCOL[kind]
    spec[kind]["match"]["port"] = GATEWAY_PORTS[proto]
    return spec


def weighted_targets(shape, g):
    """Targets are existing virtual nodes, on ports where the node has a listener."""
    ports = [NODE_PORTS["http"], NODE_PORTS["http2"]] if g.full else [NODE_PORTS["http"]]
    out = []
    for i, port in enumerate(ports):
        t = gen(shape.member, g, None, i)
        t.update(virtualNode=NODE, port=port, weight=100 // len(ports))
        out.append(t)
    return out


def gateway_route_target(value, shape, g, index):
    """A gateway route targets an existing virtual service."""
    value["virtualService"] = {"virtualServiceName": SERVICE}
    if "port" in value:
        value["port"] = NODE_PORTS["http"]
    return value


def node_spec(value, shape, g, index):
    """A node with listeners needs service discovery."""
    if value.get("listeners") and "serviceDiscovery" not in value:
        value["serviceDiscovery"] = {"dns": {"hostname": "vn.walk.local"}}
    return value


def match_range(value, shape, g, index):
    value["start"], value["end"] = 1, 100
    return value





# THE table of App Mesh's semantic rules: the only places where generated requests differ from
# "every member the model allows". Per shape: `force` members even in a minimal request, `fix` a
# generated value, or `build` a list whole.
SEMANTIC_OVERRIDES = {
    # A node with listeners needs service discovery. (Backends get distinct names from HINTS.)
    "VirtualNodeSpec": {"fix": node_spec},
    # One listener per protocol, each on its own port; the connection pool and timeout members match
    # the listener protocol; health checks: timeoutMillis < intervalMillis, http/http2 have a path.
    "Listeners": {"build": listeners_for(NODE_PROTOCOLS, NODE_PORTS, node_listener)},
    "VirtualRouterListeners": {"build": listeners_for(NODE_PROTOCOLS, NODE_PORTS, lambda l, s, g, i: l)},
    "VirtualGatewayListeners": {"build": listeners_for(GATEWAY_PROTOCOLS, GATEWAY_PORTS, gateway_listener)},
    # Exactly one route kind, on the port of a router (gateway) listener of its protocol; with
    # several listeners the match must name the port.
    "RouteSpec": {"fix": route_spec},
    "GatewayRouteSpec": {"fix": gateway_route_spec},
    "HttpRouteMatch": {"force": ["prefix", "port"]},
    "GrpcRouteMatch": {"force": ["port"]},
    "TcpRoute": {"force": ["match"]},
    "TcpRouteMatch": {"force": ["port"]},
    "HttpGatewayRouteMatch": {"force": ["prefix", "port"]},
    "GrpcGatewayRouteMatch": {"force": ["port"]},
    # Weighted targets name an existing node, on a port where it listens (required: it has several).
    "WeightedTargets": {"build": weighted_targets},
    "WeightedTarget": {"force": ["port"]},
    # A gateway route targets an existing virtual service; a provider is an existing node or router.
    "GatewayRouteTarget": {"fix": gateway_route_target},
    "VirtualNodeServiceProvider": {"fix": lambda v, s, g, i: {"virtualNodeName": NODE}},
    "VirtualRouterServiceProvider": {"fix": lambda v, s, g, i: {"virtualRouterName": ROUTER}},
    # A header range starts before it ends.
    "MatchRange": {"fix": match_range},
}


# === Requests ===


def request(op, g, names, account=None):
    """A valid input for `op`: generated members, then the resource names and meshOwner."""
    shape = MODEL.operation_model(op).input_shape
    params = gen(shape, g)
    for k in ("nextToken",):
        params.pop(k, None)
    if "limit" in params:
        params["limit"] = 1
    if "meshOwner" in params:
        params["meshOwner"] = account
    for k, v in names.items():
        if k in shape.members:
            params[k] = v
    for k in list(params):
        if k not in shape.members:
            del params[k]
    return params


def snake(op):
    return re.sub(r"(?<!^)(?=[A-Z])", "_", op).lower()


class Wire:
    """A boto3 client plus the raw HTTP exchange of its last call (botocore's event hooks)."""

    def __init__(self, endpoint):
        session = boto3.session.Session(
            aws_access_key_id="test", aws_secret_access_key="test", region_name="us-west-2"
        )
        self.client = session.client(
            "appmesh",
            endpoint_url=endpoint,
            config=Config(parameter_validation=False, retries={"max_attempts": 1}),
        )
        self.sent = None
        self.raw = None
        self.client.meta.events.register("before-send", self._before_send)
        self.client.meta.events.register("after-call", self._after_call)
        self.calls = {}

    def _before_send(self, request, **_):
        body = request.body
        if isinstance(body, bytes):
            body = body.decode(errors="replace")
        self.sent = f"{request.method} {request.url} {body or ''}"

    def _after_call(self, http_response, **_):
        self.raw = http_response

    def call(self, op, params):
        """(status, error type header, raw body text, parsed response or None)."""
        self.sent, self.raw = None, None
        self.calls[op] = self.calls.get(op, 0) + 1
        try:
            parsed = getattr(self.client, snake(op))(**params)
        except ClientError:
            parsed = None
        except Exception as e:  # a body botocore cannot parse, a connection failure
            status = self.raw.status_code if self.raw is not None else 0
            text = self.raw.content.decode(errors="replace") if self.raw is not None else ""
            return status, None, text, f"client failure: {e!r}"
        r = self.raw
        return r.status_code, r.headers.get("x-amzn-ErrorType"), r.content.decode(errors="replace"), parsed


class Report:
    def __init__(self):
        self.missed = {}  # constraint kind -> violations not answered as they should be
        self.failures = []
        self.lines = []

    def fail(self, what):
        self.failures.append(what)

    def info(self, what):
        self.lines.append(what)
        print(what, flush=True)


# === Part A: round trips ===


def normalized(op, spec):
    """The spec App Mesh stores for `spec`: the mesh's egress filter defaults to DROP_ALL."""
    spec = copy.deepcopy(spec) if spec is not None else {}
    if op in ("CreateMesh", "UpdateMesh"):
        spec.setdefault("egressFilter", {"type": "DROP_ALL"})
    return spec


class Walk:
    def __init__(self, wire, report):
        self.w = wire
        self.r = report
        self.account = None
        self.requests = {}  # op -> valid requests sent (bases for part B)

    def ok(self, op, params, label):
        status, kind, text, parsed = self.w.call(op, params)
        where = f"{op} [{label}]"
        if status != 200 or not isinstance(parsed, dict):
            self.r.fail(f"{where}: expected 200, got {status} {kind}: {text[:600]}\n    request: {self.w.sent}")
            return None
        self.requests.setdefault(op, []).append(params)
        body = json.loads(text)
        out = MODEL.operation_model(op).output_shape
        payload = out.serialization.get("payload")
        errors = []
        if payload:
            check_output_shape(out.members[payload], body, payload, errors)
        else:
            check_output_shape(out, body, "", errors)
        for e in errors:
            self.r.fail(f"{where}: response does not fit the output shape: {e}")
        return body

    def round_trip(self, op, describe_op, params, label, describe_names):
        """Create or update, then describe: both return the spec sent."""
        body = self.ok(op, params, label)
        if body is None:
            return None
        want = normalized(op, params.get("spec"))
        if body.get("spec") != want:
            self.r.fail(f"{op} [{label}]: returned spec differs from the one sent\n    sent: {json.dumps(want)}\n    got:  {json.dumps(body.get('spec'))}")
        if body.get("status", {}).get("status") != "ACTIVE":
            self.r.fail(f"{op} [{label}]: status {body.get('status')} is not ACTIVE")
        described = self.ok(describe_op, describe_names, f"after {op} {label}")
        if described is not None:
            if described.get("spec") != want:
                self.r.fail(f"{describe_op} after {op} [{label}]: spec differs from the one sent\n    sent: {json.dumps(want)}\n    got:  {json.dumps(described.get('spec'))}")
            if described.get("metadata") != body.get("metadata"):
                self.r.fail(f"{describe_op} after {op} [{label}]: metadata differs: {described.get('metadata')} vs {body.get('metadata')}")
        return body

    def kind_walk(self, create, update, describe, key, g_kind=None, min_name=None, full_name=None, parent=None):
        """Create a minimal and a full resource; update the minimal one through every variant."""
        base = {"meshName": MESH, **(parent or {})}
        g_min = Gen(False, 0, g_kind)
        p = request(create, g_min, {**base, key: min_name}, self.account)
        self.round_trip(create, describe, p, f"minimal {g_kind or ''}".strip(), {**base, key: min_name})
        p = request(create, Gen(True, 0, g_kind), {**base, key: full_name}, self.account)
        self.round_trip(create, describe, p, f"full {g_kind or ''}".strip(), {**base, key: full_name})
        seen = set()
        for k in VARIANTS:
            p = request(update, Gen(True, k, g_kind), {**base, key: min_name}, self.account)
            fingerprint = json.dumps(p.get("spec"), sort_keys=True)
            if fingerprint in seen:
                continue
            seen.add(fingerprint)
            self.round_trip(update, describe, p, f"full variant {k} {g_kind or ''}".strip(), {**base, key: min_name})
        # And back to the minimal spec: updates replace the whole spec.
        p = request(update, g_min, {**base, key: min_name}, self.account)
        self.round_trip(update, describe, p, f"minimal {g_kind or ''}".strip(), {**base, key: min_name})

    def list_walk(self, op, key, item_key, names, expect):
        """List everything, then page through with limit=1 (and meshOwner): the same items."""
        body = self.ok(op, request(op, Gen(False), names, self.account), "minimal")
        if body is None:
            return
        got = [i.get(item_key) for i in body.get(key, [])]
        missing = [n for n in expect if n not in got]
        if missing:
            self.r.fail(f"{op}: {missing} missing from {got}")
        paged, token, pages = [], None, 0
        while True:
            p = request(op, Gen(True), names, self.account)
            if token:
                p["nextToken"] = token
            page = self.ok(op, p, f"page {pages} (limit=1)")
            pages += 1
            if page is None:
                return
            items = page.get(key, [])
            if len(items) > 1:
                self.r.fail(f"{op}: limit=1 returned {len(items)} items")
            paged += [i.get(item_key) for i in items]
            token = page.get("nextToken")
            if not token or pages > len(got) + 2:
                break
        if paged != got:
            self.r.fail(f"{op}: pages of one {paged} differ from the full list {got}")

    def run(self):
        w, r = self.w, self.r
        # Meshes: the fixture mesh (full spec, tags), and one to update through every variant.
        created = self.round_trip(
            "CreateMesh", "DescribeMesh", request("CreateMesh", Gen(True), {"meshName": MESH}),
            "full", {"meshName": MESH},
        )
        if created is None:
            r.fail("cannot create the fixture mesh: stopping")
            return False
        self.account = created["metadata"]["meshOwner"]
        self.round_trip(
            "CreateMesh", "DescribeMesh", request("CreateMesh", Gen(False), {"meshName": MESH_MIN}),
            "minimal", {"meshName": MESH_MIN},
        )
        for k in VARIANTS:
            self.round_trip(
                "UpdateMesh", "DescribeMesh", request("UpdateMesh", Gen(True, k), {"meshName": MESH_MIN}),
                f"full variant {k}", {"meshName": MESH_MIN},
            )
        self.round_trip(
            "UpdateMesh", "DescribeMesh", request("UpdateMesh", Gen(False), {"meshName": MESH_MIN}),
            "minimal", {"meshName": MESH_MIN},
        )
        self.ok("DescribeMesh", request("DescribeMesh", Gen(True), {"meshName": MESH}, self.account), "with meshOwner")
        self.list_walk("ListMeshes", "meshes", "meshName", {}, [MESH, MESH_MIN])

        # Virtual nodes, routers, services, gateways (in dependency order).
        self.kind_walk("CreateVirtualNode", "UpdateVirtualNode", "DescribeVirtualNode", "virtualNodeName",
                       min_name="vn-min", full_name=NODE)
        self.kind_walk("CreateVirtualRouter", "UpdateVirtualRouter", "DescribeVirtualRouter", "virtualRouterName",
                       min_name="vr-min", full_name=ROUTER)
        self.kind_walk("CreateVirtualService", "UpdateVirtualService", "DescribeVirtualService", "virtualServiceName",
                       min_name="vs-min.walk.local", full_name=SERVICE)
        self.kind_walk("CreateVirtualGateway", "UpdateVirtualGateway", "DescribeVirtualGateway", "virtualGatewayName",
                       min_name="gw-min", full_name=GATEWAY)
        # Routes and gateway routes of each kind.
        for kind in ROUTE_KINDS:
            self.kind_walk("CreateRoute", "UpdateRoute", "DescribeRoute", "routeName", g_kind=kind,
                           min_name=f"r-{kind}-min", full_name=f"r-{kind}-full", parent={"virtualRouterName": ROUTER})
        for kind in GATEWAY_ROUTE_KINDS:
            self.kind_walk("CreateGatewayRoute", "UpdateGatewayRoute", "DescribeGatewayRoute", "gatewayRouteName",
                           g_kind=kind, min_name=f"gr-{kind}-min", full_name=f"gr-{kind}-full",
                           parent={"virtualGatewayName": GATEWAY})

        m = {"meshName": MESH}
        self.list_walk("ListVirtualNodes", "virtualNodes", "virtualNodeName", m, ["vn-min", NODE])
        self.list_walk("ListVirtualRouters", "virtualRouters", "virtualRouterName", m, ["vr-min", ROUTER])
        self.list_walk("ListVirtualServices", "virtualServices", "virtualServiceName", m, ["vs-min.walk.local", SERVICE])
        self.list_walk("ListVirtualGateways", "virtualGateways", "virtualGatewayName", m, ["gw-min", GATEWAY])
        self.list_walk("ListRoutes", "routes", "routeName", {**m, "virtualRouterName": ROUTER},
                       [f"r-{k}-{v}" for k in ROUTE_KINDS for v in ("min", "full")])
        self.list_walk("ListGatewayRoutes", "gatewayRoutes", "gatewayRouteName", {**m, "virtualGatewayName": GATEWAY},
                       [f"gr-{k}-{v}" for k in GATEWAY_ROUTE_KINDS for v in ("min", "full")])

        # Tags: those given at create, then tag, list (paged), untag.
        arn = created["metadata"]["arn"]
        sent_tags = self.requests["CreateMesh"][0].get("tags", [])
        listed = self.ok("ListTagsForResource", request("ListTagsForResource", Gen(False), {"resourceArn": arn}), "minimal")
        if listed is not None and sorted(map(json.dumps, listed.get("tags", []))) != sorted(map(json.dumps, sent_tags)):
            r.fail(f"ListTagsForResource: {listed.get('tags')} are not the tags given at create {sent_tags}")
        tag = request("TagResource", Gen(True), {"resourceArn": arn})
        self.ok("TagResource", tag, "full")
        self.ok("TagResource", request("TagResource", Gen(False), {"resourceArn": arn}), "minimal")
        all_keys = {t["key"] for t in sent_tags} | {t["key"] for t in tag["tags"]}
        pages, token, seen = 0, None, []
        while pages < 20:
            p = request("ListTagsForResource", Gen(True), {"resourceArn": arn})
            if token:
                p["nextToken"] = token
            page = self.ok("ListTagsForResource", p, f"page {pages} (limit=1)")
            pages += 1
            if page is None:
                break
            seen += [t["key"] for t in page.get("tags", [])]
            token = page.get("nextToken")
            if not token:
                break
        if set(seen) != all_keys or len(seen) != len(all_keys):
            r.fail(f"ListTagsForResource pages: {seen}, expected each of {sorted(all_keys)} once")
        self.ok("UntagResource", request("UntagResource", Gen(True), {"resourceArn": arn}), "full")
        self.ok("UntagResource", request("UntagResource", Gen(False), {"resourceArn": arn}), "minimal")
        return True

    def deletes(self):
        """Every delete, in reverse dependency order; a deleted resource describes as not found."""
        full = Gen(True)
        plan = []
        for kind in GATEWAY_ROUTE_KINDS:
            for v in ("min", "full"):
                plan.append(("DeleteGatewayRoute", "DescribeGatewayRoute",
                             {"meshName": MESH, "virtualGatewayName": GATEWAY, "gatewayRouteName": f"gr-{kind}-{v}"}))
        plan += [("DeleteVirtualGateway", "DescribeVirtualGateway", {"meshName": MESH, "virtualGatewayName": n})
                 for n in ("gw-min", GATEWAY)]
        for kind in ROUTE_KINDS:
            for v in ("min", "full"):
                plan.append(("DeleteRoute", "DescribeRoute",
                             {"meshName": MESH, "virtualRouterName": ROUTER, "routeName": f"r-{kind}-{v}"}))
        plan += [("DeleteVirtualService", "DescribeVirtualService", {"meshName": MESH, "virtualServiceName": n})
                 for n in ("vs-min.walk.local", SERVICE)]
        plan += [("DeleteVirtualRouter", "DescribeVirtualRouter", {"meshName": MESH, "virtualRouterName": n})
                 for n in ("vr-min", ROUTER)]
        plan += [("DeleteVirtualNode", "DescribeVirtualNode", {"meshName": MESH, "virtualNodeName": n})
                 for n in ("vn-min", NODE)]
        plan += [("DeleteMesh", "DescribeMesh", {"meshName": n}) for n in (MESH_MIN, MESH)]
        for i, (op, describe, names) in enumerate(plan):
            g = full if i % 2 else Gen(False)  # alternate: with and without meshOwner
            body = self.ok(op, request(op, g, names, self.account), "full" if i % 2 else "minimal")
            if body is not None and body.get("status", {}).get("status") != "DELETED":
                self.r.fail(f"{op} {names}: status {body.get('status')} is not DELETED")
            status, kind, text, _ = self.w.call(describe, names)
            if (status, kind) != (404, "NotFoundException"):
                self.r.fail(f"{describe} after {op} {names}: expected 404 NotFoundException, got {status} {kind}: {text[:300]}")


# === Part B: constraints ===

DELETE = object()


def path_text(path):
    out = ""
    for seg in path:
        out += f"[{seg}]" if isinstance(seg, int) else (f".{seg}" if out else seg)
    return out


def template(path):
    return tuple("*" if isinstance(s, int) else s for s in path)


def too_short(value, n):
    return (value or "x")[0] * n


def pattern_breaker(shape, valid):
    """A string of valid length that the shape's pattern rejects."""
    pattern = shape.metadata["pattern"]
    lo = shape.metadata.get("min", 0)
    for candidate in ("has space", " leading-space", "trailing-space ", "tab\tx", "caf\u00e9"):
        if len(candidate) >= lo and not re.search(pattern, candidate):
            return candidate
    raise ValueError(f"no candidate breaks {pattern}")


class Site:
    """One violation: the path, the constraint, its model-level key, and the bad value."""

    def __init__(self, path, kind, key, value, detail=""):
        self.path, self.kind, self.key, self.value, self.detail = path, kind, key, value, detail


def sites(shape, value, path, container, member, out):
    t = shape.type_name
    md = shape.metadata
    if t == "structure":
        if md.get("union"):
            out.append(Site(path, "union: none set", (shape.name, "", "union-none"), {}))
            if len(shape.members) > 1:
                present = next(iter(value))
                other = next(m for m in shape.members if m != present)
                two = dict(value)
                two[other] = gen(shape.members[other], Gen(False), other)
                out.append(Site(path, f"union: {present} and {other} set", (shape.name, "", "union-many"), two))
        for name in shape.required_members:
            if name in value:
                out.append(Site(path + [name], "required", (shape.name, name, "required"), DELETE))
        for name, v in value.items():
            sites(shape.members[name], v, path + [name], shape.name, name, out)
    elif t == "list":
        lo, hi = md.get("min"), md.get("max")
        if lo:
            out.append(Site(path, f"list min {lo}", (container, member, "list-min"), value[: lo - 1]))
        if hi is not None and value:
            more = (value * (hi + 1))[: hi + 1]
            out.append(Site(path, f"list max {hi}", (container, member, "list-max"), more))
        for i in reversed(range(len(value))):
            sites(shape.member, value[i], path + [i], shape.name, "member", out)
    elif t == "string":
        if shape.enum:
            out.append(Site(path, "enum", (container, member, "enum"), "NOT_IN_ENUM"))
            return
        lo, hi = md.get("min"), md.get("max")
        if lo:
            out.append(Site(path, f"min length {lo}", (container, member, "min"), too_short(value, lo - 1)))
        if hi is not None:
            out.append(Site(path, f"max length {hi}", (container, member, "max"), (value or "x")[0] * (hi + 1)))
        if "pattern" in md:
            out.append(Site(path, "pattern", (container, member, "pattern"), pattern_breaker(shape, value)))
    elif t in ("integer", "long"):
        lo, hi = md.get("min"), md.get("max")
        if lo is not None:
            out.append(Site(path, f"min {lo}", (container, member, "min"), lo - 1))
        if hi is not None:
            out.append(Site(path, f"max {hi}", (container, member, "max"), hi + 1))


def model_constraints():
    """Every constraint key the model states on what some operation's input reaches."""
    keys = set()
    seen = set()

    def walk(shape, container, member):
        t = shape.type_name
        md = shape.metadata
        mark = (shape.name, container, member)
        if mark in seen:
            return
        seen.add(mark)
        if t == "structure":
            if md.get("union"):
                keys.add((shape.name, "", "union-none"))
                if len(shape.members) > 1:
                    keys.add((shape.name, "", "union-many"))
            for name in shape.required_members:
                keys.add((shape.name, name, "required"))
            for name, m in shape.members.items():
                walk(m, shape.name, name)
        elif t == "list":
            if md.get("min"):
                keys.add((container, member, "list-min"))
            if md.get("max") is not None:
                keys.add((container, member, "list-max"))
            walk(shape.member, shape.name, "member")
        elif t == "string":
            if shape.enum:
                keys.add((container, member, "enum"))
                return
            if md.get("min"):
                keys.add((container, member, "min"))
            if md.get("max") is not None:
                keys.add((container, member, "max"))
            if "pattern" in md:
                keys.add((container, member, "pattern"))
        elif t in ("integer", "long"):
            if md.get("min") is not None:
                keys.add((container, member, "min"))
            if md.get("max") is not None:
                keys.add((container, member, "max"))

    for op in MODEL.operation_names:
        walk(MODEL.operation_model(op).input_shape, None, None)
    return keys


def not_expressible():
    """Constraints no HTTP request can break: a URI label is part of the path, so it is always
    present; and an empty label at the end of the path makes another path (DescribeMesh with ""
    is `GET /v20190125/meshes/`, ListMeshes with a trailing slash). Empty labels inside the path
    (`/meshes//virtualNodes`) are exercised."""
    out = {}
    for op in MODEL.operation_names:
        model = MODEL.operation_model(op)
        shape = model.input_shape
        uri = model.http["requestUri"].split("?")[0].rstrip("/")
        for name, m in shape.members.items():
            if m.serialization.get("location") == "uri":
                out[(shape.name, name, "required")] = "URI label: always present in the path"
                if uri.endswith("{" + name + "}"):
                    out[(shape.name, name, "min")] = "URI label at the end: an empty one is another path"
    return out


def set_at(params, path, value):
    params = copy.deepcopy(params)
    target = params
    for seg in path[:-1]:
        target = target[seg]
    if value is DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = copy.deepcopy(value)
    return params


def violations(walk, wire, report):
    exclusions = not_expressible()
    want = model_constraints()
    covered = set()
    sent = 0
    per_op = {}
    for op in MODEL.operation_names:
        shape = MODEL.operation_model(op).input_shape
        bases = walk.violation_bases.get(op, [])
        if not bases:
            report.fail(f"{op}: no valid request to derive violations from")
            continue
        done = set()
        for base in bases:
            found = []
            sites(shape, base, [], None, None, found)
            for s in found:
                if s.key in exclusions:
                    continue
                dedupe = (template(s.path), s.kind)
                if dedupe in done:
                    continue
                done.add(dedupe)
                bad = set_at(base, s.path, s.value) if s.path else s.value
                status, kind, text, _ = wire.call(op, bad)
                sent += 1
                per_op[op] = per_op.get(op, 0) + 1
                covered.add(s.key)
                field = path_text(s.path)
                try:
                    message = json.loads(text).get("message", "")
                except ValueError:
                    message = ""
                if VERBOSE:
                    print(f"  {op} {field} ({s.kind}): {status} {kind} {message}")
                named = re.search(re.escape(field) + r"(?![\w.\[])", message) is not None
                if (status, kind) != (400, "BadRequestException") or not named:
                    family = s.kind.split(":")[0].split(" ")[0]
                    report.missed[family] = report.missed.get(family, 0) + 1
                    report.fail(
                        f"{op}: {field} ({s.kind}) expected 400 BadRequestException naming {field!r}, "
                        f"got {status} {kind}: {text[:300]}\n    request: {wire.sent[:700] if wire.sent else '(none sent)'}"
                    )
                    if status == 200:
                        undo(op, base, wire)
    missing = sorted(want - covered - set(exclusions))
    for key in missing:
        report.fail(f"model constraint never exercised: {key}")
    report.info(f"constraints: {len(covered)} of {len(want)} model constraints exercised "
                f"({len(set(exclusions) & want)} not expressible over HTTP: required URI labels, empty last labels), "
                f"{sent} violating requests over {len(per_op)} operations")
    for op in sorted(per_op):
        report.info(f"  {op}: {per_op[op]} violations")


def undo(op, base, wire):
    """A violation the server accepted: put things back so later requests stay valid."""
    if op.startswith("Create"):
        kind = op[len("Create"):]
        delete = f"Delete{kind}"
        shape = MODEL.operation_model(delete).input_shape
        wire.call(delete, {k: v for k, v in base.items() if k in shape.members and k != "meshOwner"})
    elif op.startswith("Update"):
        wire.call(op, base)


def build_violation_bases(walk):
    """Valid requests for every operation against the fixtures that exist during part B."""
    a = walk.account
    bases = {}

    def add(op, names, kinds=(None,), variants=True):
        for kind in kinds:
            gens = [Gen(False, 0, kind)] + ([Gen(True, k, kind) for k in VARIANTS] if variants else [Gen(True, 0, kind)])
            for g in gens:
                bases.setdefault(op, []).append(request(op, g, names, a))

    m = {"meshName": MESH}
    add("CreateMesh", {"meshName": "bad-mesh"})
    add("UpdateMesh", {"meshName": MESH_MIN})
    add("DescribeMesh", {"meshName": MESH_MIN}, variants=False)
    add("DeleteMesh", {"meshName": MESH_MIN}, variants=False)
    add("ListMeshes", {}, variants=False)
    for kind, key, name in (("VirtualNode", "virtualNodeName", "vn-min"),
                            ("VirtualRouter", "virtualRouterName", "vr-min"),
                            ("VirtualService", "virtualServiceName", "vs-min.walk.local"),
                            ("VirtualGateway", "virtualGatewayName", "gw-min")):
        add(f"Create{kind}", {**m, key: f"bad-{key}"})
        add(f"Update{kind}", {**m, key: name})
        add(f"Describe{kind}", {**m, key: name}, variants=False)
        add(f"Delete{kind}", {**m, key: name}, variants=False)
        add(f"List{kind}s", m, variants=False)
    r = {**m, "virtualRouterName": ROUTER}
    add("CreateRoute", {**r, "routeName": "bad-route"}, kinds=ROUTE_KINDS)
    for kind in ROUTE_KINDS:
        add("UpdateRoute", {**r, "routeName": f"r-{kind}-min"}, kinds=[kind])
    add("DescribeRoute", {**r, "routeName": "r-httpRoute-min"}, variants=False)
    add("DeleteRoute", {**r, "routeName": "r-httpRoute-min"}, variants=False)
    add("ListRoutes", r, variants=False)
    gw = {**m, "virtualGatewayName": GATEWAY}
    add("CreateGatewayRoute", {**gw, "gatewayRouteName": "bad-gateway-route"}, kinds=GATEWAY_ROUTE_KINDS)
    for kind in GATEWAY_ROUTE_KINDS:
        add("UpdateGatewayRoute", {**gw, "gatewayRouteName": f"gr-{kind}-min"}, kinds=[kind])
    add("DescribeGatewayRoute", {**gw, "gatewayRouteName": "gr-httpRoute-min"}, variants=False)
    add("DeleteGatewayRoute", {**gw, "gatewayRouteName": "gr-httpRoute-min"}, variants=False)
    add("ListGatewayRoutes", gw, variants=False)
    arn = f"arn:aws:appmesh:{walk.region}:{a}:mesh/{MESH}"
    for op in ("TagResource", "UntagResource", "ListTagsForResource"):
        add(op, {"resourceArn": arn}, variants=False)
    return bases


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoint", required=True)
    args = ap.parse_args()
    report = Report()
    wire = Wire(args.endpoint)
    walk = Walk(wire, report)
    ok = walk.run()
    if ok:
        described = wire.client.describe_mesh(meshName=MESH)
        walk.region = described["mesh"]["metadata"]["arn"].split(":")[3]
        walk.violation_bases = build_violation_bases(walk)
        violations(walk, wire, report)
        walk.deletes()
    ops = set(MODEL.operation_names)
    called = {op for op in walk.requests}
    report.info(f"operations: {len(called & ops)} of {len(ops)} called with valid requests "
                f"({sum(len(v) for v in walk.requests.values())} valid requests)")
    for op in sorted(ops - called):
        report.fail(f"operation never called with a valid request: {op}")
    if report.failures:
        print(f"\n{len(report.failures)} FAILURES:", flush=True)
        for f in report.failures:
            print(f"- {f}")
        if report.missed:
            summary = ", ".join(f"{k}: {n}" for k, n in sorted(report.missed.items()))
            print(f"\nviolations not answered with a 400 BadRequestException naming the field, by constraint kind: {summary}")
        sys.exit(1)
    print("model walk: all operations round-trip and every constraint is enforced")


if __name__ == "__main__":
    main()
