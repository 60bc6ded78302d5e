"""A registry token service for tests: the ``WWW-Authenticate: Bearer`` flow of Docker's token auth.

``TokenIssuer`` holds an ECDSA P-256 key and a self-signed certificate (the registry's
``rootcertbundle``) and signs ES256 JWTs with the certificate in the ``x5c`` header, which is how
CNCF distribution verifies them. ``serve_tokens`` runs ``GET /token?service=&scope=`` on
127.0.0.1 (aiohttp, in the test's loop), checking HTTP basic credentials, and counts what it issued.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

SERVICE = "edge-test-registry"
ISSUER = "edge-test-issuer"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class TokenIssuer:
    """Signs registry tokens for ``users`` (username → password)."""

    users: dict[str, str]
    key: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))
    issued: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ISSUER)])
        now = datetime.now(timezone.utc)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )

    def write_bundle(self, path: Path) -> Path:
        """The certificate as the registry's ``rootcertbundle``."""
        path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        return path

    def token(self, subject: str, scope: str) -> str:
        """An ES256 JWT granting ``scope`` (``repository:<name>:<actions>``)."""
        header = {
            "typ": "JWT",
            "alg": "ES256",
            "x5c": [base64.b64encode(self.cert.public_bytes(serialization.Encoding.DER)).decode()],
        }
        now = int(time.time())
        access = []
        if scope:
            kind, name, actions = scope.split(":", 2)
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        claims = {
            "iss": ISSUER,
            "sub": subject,
            "aud": SERVICE,
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
        der = self.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        self.issued.append(scope)
        return f"{signing_input}.{_b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    async def handle(self, request: web.Request) -> web.Response:
        """``GET /token``: 401 without the right basic credentials, else ``{"token": ...}``."""
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Basic "):
            return web.json_response({"errors": [{"code": "UNAUTHORIZED"}]}, status=401)
        user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
        if self.users.get(user) != password:
            return web.json_response(
                {"errors": [{"code": "UNAUTHORIZED", "message": "bad password"}]}, status=401
            )
        if request.query.get("service") != SERVICE:
            return web.json_response(
                {"errors": [{"code": "DENIED", "message": "unknown service"}]}, status=400
            )
        return web.json_response({"token": self.token(user, request.query.get("scope", ""))})


async def serve_tokens(issuer: TokenIssuer) -> tuple[web.AppRunner, str]:
    """Run the token service on 127.0.0.1 (a free port); ``(runner, realm URL)``."""
    app = web.Application()
    app.router.add_get("/token", issuer.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}/token"
