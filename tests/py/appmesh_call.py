"""One App Mesh call through boto3, signed as boto3 signs: `appmesh_call.py < request.json`.

The request: {"endpoint", "region", "key", "secret", "token"?, "caBundle"?, "operation",
"params"?, "presign"?, "expiresIn"?, "signedSecondsAgo"?}. With "presign", boto3 makes a
presigned URL (SigV4 query form) and urllib fetches it. "signedSecondsAgo" moves botocore's
signing clock back, as a captured request replayed later would carry.

Prints {"result": ...} or {"error": {"code", "message", "status"}} (and "url" when presigned).
"""

import datetime
import json
import ssl
import sys
import urllib.error
import urllib.request

import boto3
import botocore.auth
import botocore.config
from botocore.exceptions import ClientError

req = json.load(sys.stdin)
ago = req.get("signedSecondsAgo")
if ago:
    real = botocore.auth.get_current_datetime
    botocore.auth.get_current_datetime = lambda *a, **k: real(*a, **k) - datetime.timedelta(
        seconds=ago
    )

session = boto3.session.Session(
    aws_access_key_id=req["key"],
    aws_secret_access_key=req["secret"],
    aws_session_token=req.get("token"),
    region_name=req["region"],
)
client = session.client(
    "appmesh",
    endpoint_url=req["endpoint"],
    verify=req.get("caBundle", True),
    config=botocore.config.Config(retries={"max_attempts": 1, "mode": "standard"}),
)
op = req["operation"]
params = req.get("params", {})
try:
    if req.get("presign"):
        url = client.generate_presigned_url(op, Params=params, ExpiresIn=req.get("expiresIn", 300))
        ctx = None
        if url.startswith("https"):
            ctx = ssl.create_default_context(cafile=req.get("caBundle"))
        try:
            with urllib.request.urlopen(url, context=ctx) as r:
                out = {"result": json.loads(r.read()), "url": url}
        except urllib.error.HTTPError as e:
            body = json.loads(e.read() or b"{}")
            out = {
                "error": {
                    "code": e.headers.get("x-amzn-ErrorType"),
                    "message": body.get("message"),
                    "status": e.code,
                },
                "url": url,
            }
    else:
        result = getattr(client, op)(**params)
        result.pop("ResponseMetadata", None)
        out = {"result": result}
except ClientError as e:
    out = {
        "error": {
            "code": e.response["Error"]["Code"],
            "message": e.response["Error"]["Message"],
            "status": e.response["ResponseMetadata"]["HTTPStatusCode"],
        }
    }
print(json.dumps(out, default=str))
