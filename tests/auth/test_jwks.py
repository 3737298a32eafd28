"""RS256 tokens verified against a JWKS URL (an identity provider's keys), over loopback."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from orgwallet.auth.tokens import JwtVerifier
from orgwallet.config import Settings
from orgwallet.errors import Unauthenticated

KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def jwks_url() -> Iterator[str]:
    jwk = json.loads(RSAAlgorithm.to_jwk(KEY.public_key()))
    body = json.dumps({"keys": [{**jwk, "kid": "k1", "use": "sig", "alg": "RS256"}]}).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/.well-known/jwks.json"
    server.shutdown()


def token(key: rsa.RSAPrivateKey, **overrides: object) -> str:
    now = int(time.time())
    claims = {
        "sub": "idp|alice",
        "iss": "https://idp.example",
        "aud": "orgwallet",
        "iat": now,
        "exp": now + 60,
    }
    claims.update(overrides)
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": "k1"})


@pytest.fixture
def verifier(jwks_url: str) -> JwtVerifier:
    return JwtVerifier(
        Settings(jwt_jwks_url=jwks_url, jwt_issuer="https://idp.example", platform_admins=["idp|root"])
    )


def test_a_token_signed_by_the_identity_provider_is_accepted(verifier: JwtVerifier) -> None:
    principal = verifier.verify(token(KEY, email="alice@example.com"))
    assert (principal.subject, principal.email, principal.is_platform_admin) == (
        "idp|alice",
        "alice@example.com",
        False,
    )
    assert verifier.verify(token(KEY, sub="idp|root")).is_platform_admin


@pytest.mark.parametrize(
    ("key", "claims"),
    [
        (OTHER_KEY, {}),
        (KEY, {"iss": "https://evil.example"}),
        (KEY, {"aud": "another-api"}),
        (KEY, {"exp": int(time.time()) - 3600}),
    ],
    ids=["unknown key", "wrong issuer", "wrong audience", "expired"],
)
def test_anything_else_is_refused(
    verifier: JwtVerifier, key: rsa.RSAPrivateKey, claims: dict[str, object]
) -> None:
    with pytest.raises(Unauthenticated):
        verifier.verify(token(key, **claims))


def test_an_hs256_token_is_refused_when_keys_come_from_jwks(verifier: JwtVerifier) -> None:
    forged = jwt.encode(
        {"sub": "idp|root", "iss": "https://idp.example", "aud": "orgwallet", "exp": int(time.time()) + 60},
        "guess" * 10,
        algorithm="HS256",
        headers={"kid": "k1"},
    )
    with pytest.raises(Unauthenticated):
        verifier.verify(forged)
