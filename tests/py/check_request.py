"""Validates request files against botocore's input shapes (what the AWS CLI and SDKs send).

Usage: check_request.py SERVICE OPERATION FILE [FILE...]   (exit 1 with every problem found)
Each FILE is a JSON request body as `aws SERVICE OPERATION --cli-input-json file://FILE` takes it.
Beyond botocore's own parameter validation (types, required members, ranges), members the model
does not have and values outside an enum are reported: botocore checks neither, and the service
would reject the value (or silently ignore a misspelt field).
"""
import json
import sys

import botocore.session
from botocore.validate import ParamValidator


def model_rules(shape, value, path, errors):
    t = shape.type_name
    if t == "structure" and isinstance(value, dict):
        for k, v in value.items():
            if k not in shape.members:
                errors.append(f"{path}.{k}: not a member of {shape.name}")
            else:
                model_rules(shape.members[k], v, f"{path}.{k}", errors)
    elif t == "list" and isinstance(value, list):
        for i, v in enumerate(value):
            model_rules(shape.member, v, f"{path}[{i}]", errors)
    elif t == "string" and isinstance(value, str) and shape.enum and value not in shape.enum:
        errors.append(f"{path}: {value!r} not in enum {shape.enum}")
    elif t == "map" and isinstance(value, dict):
        for k, v in value.items():
            model_rules(shape.value, v, f"{path}.{k}", errors)


def main():
    service, operation, files = sys.argv[1], sys.argv[2], sys.argv[3:]
    model = botocore.session.get_session().get_service_model(service)
    shape = model.operation_model(operation).input_shape
    failed = False
    for f in files:
        with open(f) as fh:
            params = json.load(fh)
        errors = []
        report = ParamValidator().validate(params, shape)
        if report.has_errors():
            errors.append(report.generate_report())
        model_rules(shape, params, "", errors)
        for e in errors:
            print(f"{f}: {service} {operation}: {e}")
        failed = failed or bool(errors)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
