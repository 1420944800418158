"""Checks an App Mesh response body against the botocore model's output shape.

botocore validates requests, not responses; this walks the output shape and fails on a missing
required member, a member the model does not have, a wrong type, or a value outside an enum.
Usage: check_shape.py OPERATION < response.json   (exit 1 with the field path on failure)
"""
import json
import sys

import botocore.session


def check(shape, value, path, errors):
    t = shape.type_name
    if t == "structure":
        if not isinstance(value, dict):
            errors.append(f"{path}: expected object, got {type(value).__name__}")
            return
        for req in shape.metadata.get("required", []):
            if req not in value:
                errors.append(f"{path}.{req}: required member missing")
        for k, v in value.items():
            if k not in shape.members:
                errors.append(f"{path}.{k}: not a member of {shape.name}")
            else:
                check(shape.members[k], v, f"{path}.{k}", errors)
        if shape.metadata.get("union") and len(value) != 1:
            errors.append(f"{path}: union {shape.name} must have exactly one member, has {sorted(value)}")
    elif t == "list":
        if not isinstance(value, list):
            errors.append(f"{path}: expected list")
            return
        for i, v in enumerate(value):
            check(shape.member, v, f"{path}[{i}]", errors)
    elif t == "map":
        if not isinstance(value, dict):
            errors.append(f"{path}: expected map")
    elif t == "string":
        if not isinstance(value, str):
            errors.append(f"{path}: expected string, got {value!r}")
        elif shape.enum and value not in shape.enum:
            errors.append(f"{path}: {value!r} not in enum {shape.enum}")
    elif t in ("integer", "long"):
        if not isinstance(value, int) or isinstance(value, bool):
            errors.append(f"{path}: expected integer, got {value!r}")
    elif t == "boolean":
        if not isinstance(value, bool):
            errors.append(f"{path}: expected boolean, got {value!r}")
    elif t == "timestamp":
        # rest-json timestamps are epoch seconds (numbers); strings break strict SDK parsers.
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            errors.append(f"{path}: expected epoch-seconds number, got {value!r}")
    elif t in ("double", "float"):
        if not isinstance(value, (int, float)):
            errors.append(f"{path}: expected number, got {value!r}")


def main():
    op = sys.argv[1]
    model = botocore.session.get_session().get_service_model("appmesh")
    out = model.operation_model(op).output_shape
    body = json.load(sys.stdin)
    payload = out.serialization.get("payload")
    errors = []
    if payload:
        check(out.members[payload], body, payload, errors)
    else:
        check(out, body, "", errors)
    if errors:
        print("\n".join(errors))
        sys.exit(1)


if __name__ == "__main__":
    main()
