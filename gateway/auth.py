"""Bearer-token authentication and role checks for the gateway.

Each token has roles; each RPC belongs to a method class that needs one role:

| class | methods | role |
|---|---|---|
| read | SearchService.Search, .Get, EncoderService.EncodeText, .EncodeImage | read |
| write | SearchService.Upsert, .Delete | write |
| admin | AdminService.* and any method not listed here | admin |
| open | grpc.health.v1.Health.*, server reflection | none |

Roles do not imply each other: a token that may write and read lists both. Tokens are kept
only as sha256 digests; a presented token is hashed and compared against every stored
digest with `hmac.compare_digest` (no early exit), so timing tells nothing about which
digest came close. Missing or unknown token → UNAUTHENTICATED; known token without the
role → PERMISSION_DENIED. Messages never echo the token.

`python -m gateway.auth new --roles read,write [--name NAME]` prints a fresh token and the
line to put in the tokens file.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import ipaddress
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from clipsearch.settings import AuthSettings

ROLES = ("read", "write", "admin")

CLASS_OF_METHOD: dict[str, str] = {
    "/clipsearch.v1.SearchService/Search": "read",
    "/clipsearch.v1.SearchService/Get": "read",
    "/clipsearch.v1.EncoderService/EncodeText": "read",
    "/clipsearch.v1.EncoderService/EncodeImage": "read",
    "/clipsearch.v1.SearchService/Upsert": "write",
    "/clipsearch.v1.SearchService/Delete": "write",
}
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def method_class(method: str) -> str:
    """`read`, `write`, `admin` or `open` for a full method name (`/pkg.Service/Method`)."""
    if method.startswith(OPEN_PREFIXES):
        return "open"
    return CLASS_OF_METHOD.get(method, "admin")


def digest(token: str) -> bytes:
    """The stored form of a token."""
    return hashlib.sha256(token.encode("utf-8")).digest()


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a token belongs to (a name for logs) and what it may do."""

    name: str
    roles: frozenset[str]


def _roles(text: str, where: str) -> frozenset[str]:
    roles = frozenset(r.strip() for r in text.split(",") if r.strip())
    unknown = roles - set(ROLES)
    if not roles or unknown:
        raise ValueError(f"{where}: roles must be a comma-separated subset of {', '.join(ROLES)}")
    return roles


def parse_tokens_file(text: str, source: str = "tokens file") -> list[tuple[bytes, Principal]]:
    """Lines of `<sha256 hex> <roles> [name]`; blank lines and `#` comments are skipped."""
    entries = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        where = f"{source} line {number}"
        if len(parts) not in (2, 3) or len(parts[0]) != 64:
            raise ValueError(f"{where}: expected `<sha256 hex> <roles> [name]`")
        try:
            hashed = bytes.fromhex(parts[0])
        except ValueError:
            raise ValueError(f"{where}: the digest is not hexadecimal") from None
        name = parts[2] if len(parts) == 3 else f"{source}:{number}"
        entries.append((hashed, Principal(name, _roles(parts[1], where))))
    return entries


def parse_plain_tokens(text: str) -> list[tuple[bytes, Principal]]:
    """`roles=token;roles=token` (from the environment); only digests are kept."""
    entries = []
    for number, item in enumerate((i.strip() for i in text.split(";")), 1):
        if not item:
            continue
        roles, sep, token = item.partition("=")
        where = f"auth.tokens entry {number}"
        if not sep or not token:
            raise ValueError(f"{where}: expected `roles=token`")
        entries.append((digest(token), Principal(f"env:{number}", _roles(roles, where))))
    return entries


class TokenStore:
    """Digests → principals, looked up in constant time per stored entry."""

    def __init__(self, entries: Iterable[tuple[bytes, Principal]]) -> None:
        self._entries = list(entries)

    def __len__(self) -> int:
        return len(self._entries)

    @classmethod
    def from_settings(cls, auth: AuthSettings) -> TokenStore:
        entries = parse_plain_tokens(auth.tokens.get_secret_value())
        if auth.tokens_file is not None:
            entries += parse_tokens_file(
                Path(auth.tokens_file).read_text(), Path(auth.tokens_file).name
            )
        return cls(entries)

    def lookup(self, token: str) -> Principal | None:
        presented = digest(token)
        found = None
        for stored, principal in self._entries:  # no early exit
            if hmac.compare_digest(presented, stored) and found is None:
                found = principal
        return found


class Authenticator:
    """Decides, from the method and the call's metadata, whether a call may proceed."""

    def __init__(self, store: TokenStore) -> None:
        self._store = store

    def check(
        self, method: str, metadata: Sequence[tuple[str, str | bytes]] | None
    ) -> tuple[grpc.StatusCode, str] | None:
        """None when allowed, else (status, message)."""
        needed = method_class(method)
        if needed == "open":
            return None
        header = None
        for key, value in metadata or ():
            if key == "authorization":
                header = value.decode("latin-1") if isinstance(value, bytes) else value
                break
        if header is None:
            return (
                grpc.StatusCode.UNAUTHENTICATED,
                "missing `authorization: Bearer <token>` metadata",
            )
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return (
                grpc.StatusCode.UNAUTHENTICATED,
                "the authorization metadata must be `Bearer <token>`",
            )
        principal = self._store.lookup(token.strip())
        if principal is None:
            return grpc.StatusCode.UNAUTHENTICATED, "unknown token"
        if needed not in principal.roles:
            return (
                grpc.StatusCode.PERMISSION_DENIED,
                f"this token lacks the `{needed}` role needed for {method.rsplit('/', 1)[-1]}",
            )
        return None


def authenticator_for(auth: AuthSettings) -> Authenticator | None:
    """The configured authenticator, or None when auth is off."""
    store = TokenStore.from_settings(auth)
    enabled = auth.enabled if auth.enabled is not None else len(store) > 0
    if not enabled:
        return None
    if len(store) == 0:
        raise ValueError("auth is enabled but no tokens are configured (auth.tokens_file/tokens)")
    return Authenticator(store)


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (IPv4 or IPv6, bracketed or not)."""
    name = host.strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gateway.auth")
    sub = parser.add_subparsers(dest="command", required=True)
    new = sub.add_parser("new", help="print a new token and its tokens-file line")
    new.add_argument("--roles", required=True, help="comma-separated: read, write, admin")
    new.add_argument("--name", default="")
    args = parser.parse_args(argv)
    roles = ",".join(sorted(_roles(args.roles, "--roles")))
    token = secrets.token_urlsafe(32)
    print(f"token: {token}")
    print(f"tokens-file line: {digest(token).hex()} {roles} {args.name}".rstrip())


if __name__ == "__main__":
    main()
