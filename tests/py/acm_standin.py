"""A stand-in for ACM's ExportCertificate and ACM PCA's GetCertificateAuthorityCertificate:
`acm_standin.py STATE_FILE`.

Why a stand-in: moto's ACM issues self-signed "private" certificates that chain to no ACM PCA,
and it has neither operation with real semantics. This speaks both operations' AWS JSON 1.1
shapes (botocore acm/2015-12-08 and acm-pca/2017-08-22: X-Amz-Target
`CertificateManager.ExportCertificate` {CertificateArn, Passphrase (base64 blob)} →
{Certificate, CertificateChain, PrivateKey}; `ACMPrivateCA.GetCertificateAuthorityCertificate`
{CertificateAuthorityArn} → {Certificate, CertificateChain}), backed by openssl-made files named
in STATE_FILE, read afresh on each request (a test rotates a certificate by rewriting it):

  {"certificates": {ARN: {"cert": PEM_PATH, "key": PEM_PATH, "chain": PEM_PATH}},
   "authorities": {ARN: {"cert": PEM_PATH}},
   "denied": [ARN, ...]}

The private key is really encrypted as PKCS#8 PBES2 (PBKDF2-HMAC-SHA256, AES-256-CBC) with the
passphrase the caller sent, by `openssl pkcs8 -topk8 -v2 aes-256-cbc`; the passphrase reaches
openssl through a pipe, never an argument. An unknown ARN is ResourceNotFoundException, a denied
one AccessDeniedException (what a missing IAM permission gives). Each call is logged as
`call TARGET ARN` (never the passphrase). Binds port 0 on loopback and prints
`acm stand-in listening on 127.0.0.1:PORT`.
"""

import base64
import json
import os
import subprocess
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STATE = sys.argv[1]


def read(path):
    with open(path) as f:
        return f.read()


def encrypt(key_path, passphrase):
    r, w = os.pipe()
    os.write(w, passphrase + b"\n")
    os.close(w)
    try:
        out = subprocess.run(
            ["openssl", "pkcs8", "-topk8", "-v2", "aes-256-cbc", "-v2prf", "hmacWithSHA256",
             "-in", key_path, "-passout", "fd:%d" % r],
            check=True, capture_output=True, pass_fds=(r,),
        )
    finally:
        os.close(r)
    return out.stdout.decode()


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        target = self.headers.get("X-Amz-Target", "")
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"{}")
        with open(STATE) as f:
            state = json.load(f)
        if target == "CertificateManager.ExportCertificate":
            arn = body.get("CertificateArn", "")
            sys.stderr.write("call %s %s\n" % (target, arn))
            passphrase = base64.b64decode(body.get("Passphrase", ""))
            if len(passphrase) < 4:
                return self.error(400, "ValidationException", "Passphrase is too short")
            if arn in state.get("denied", []):
                return self.error(400, "AccessDeniedException", "not authorized to export " + arn)
            c = state.get("certificates", {}).get(arn)
            if c is None:
                return self.error(400, "ResourceNotFoundException", "no certificate " + arn)
            return self.answer({
                "Certificate": read(c["cert"]),
                "CertificateChain": read(c["chain"]),
                "PrivateKey": encrypt(c["key"], passphrase),
            })
        if target == "ACMPrivateCA.GetCertificateAuthorityCertificate":
            arn = body.get("CertificateAuthorityArn", "")
            sys.stderr.write("call %s %s\n" % (target, arn))
            if arn in state.get("denied", []):
                return self.error(400, "AccessDeniedException", "not authorized for " + arn)
            a = state.get("authorities", {}).get(arn)
            if a is None:
                return self.error(400, "ResourceNotFoundException", "no authority " + arn)
            # A root CA: no chain (the API returns none).
            return self.answer({"Certificate": read(a["cert"])})
        return self.error(400, "UnknownOperationException", "unknown target " + target)

    def answer(self, doc, status=200):
        data = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/x-amz-json-1.1")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def error(self, status, code, message):
        self.answer({"__type": code, "message": message}, status)

    def log_message(self, fmt, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print("acm stand-in listening on 127.0.0.1:%d" % server.server_address[1], flush=True)
server.serve_forever()
