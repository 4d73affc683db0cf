"""Bearer keys: API keys for /v1 (and the schema), admin keys for /admin.

Keys are resolved where they are used (each replica reads its own environment) and where the app is
built (which refuses to start without them): a service that resolves no API key or no admin key
fails with the config keys and environment variables it read, unless ``auth.open`` says to serve
that kind to anyone. Each key has a name (``name:key`` entries; a hash of the key otherwise), which
is what metrics and limits see: a key itself is never logged or exported.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from icl_router.config import AuthConfig, ConfigError
from icl_router.serving.api_errors import ApiError

log = logging.getLogger("icl_router.serving")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
OPEN = "open"  # the name a request gets when its kind of key is open


def key_name(key: str) -> str:
    """The name of a bare key: stable across replicas and restarts, and not the key."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]


def parse_keys(entries: list[str]) -> dict[str, str]:
    """key -> name, from entries ``key`` or ``name:key`` (the name before the first colon)."""
    out: dict[str, str] = {}
    for entry in entries:
        name, sep, key = entry.partition(":")
        if not sep or not NAME.match(name):
            name, key = key_name(entry), entry
        out[key] = name
    return out


def _entries(listed: list[str], env_name: str | None, env: Mapping[str, str]) -> list[str]:
    return [*listed, *(k.strip() for k in env.get(env_name or "", "").split(",") if k.strip())]


def _where(auth: AuthConfig, kind: str) -> str:
    var = getattr(auth, f"{kind}_keys_env")
    return f"auth.{kind}_keys" + (f" and ${var}" if var else " (auth.{kind}_keys_env names no variable)")


@dataclass(frozen=True)
class Keys:
    api: Mapping[str, str]  # key -> name
    admin: Mapping[str, str]
    open: frozenset[str] = frozenset()  # the kinds served without a key ("api", "admin")

    @classmethod
    def from_config(cls, auth: AuthConfig, env: Mapping[str, str] | None = None) -> Keys:
        """Resolve the keys from the config and ``env`` (default: this process's environment). Raises
        ConfigError when a kind resolves none and the config does not open it."""
        env = os.environ if env is None else env
        api, admin = parse_keys(_entries(auth.api_keys, auth.api_keys_env, env)), parse_keys(_entries(auth.admin_keys, auth.admin_keys_env, env))
        missing = [kind for kind, keys in (("api", api), ("admin", admin)) if not keys]
        if missing and not auth.open:
            what = " and ".join({"api": "no API key", "admin": "no admin key"}[k] for k in missing)
            read = "; ".join(_where(auth, k) for k in missing)
            raise ConfigError(
                f"{what}: read {read}, found none. Set the variable(s) to comma-separated keys (name:key names a key), "
                "list them in the config, or set auth.open: true to serve without them (anyone could route, deploy and delete models)"
            )
        return cls(api, admin, frozenset(missing))

    def warn_open(self) -> None:
        if self.open:
            log.warning("auth.open: %s served WITHOUT a key: anyone who reaches the service can use it", " and ".join(
                {"api": "the API (/v1)", "admin": "the admin API (/admin: deploy and delete models)"}[k] for k in sorted(self.open)))

    def check(self, authorization: str | None, *, admin: bool = False, either: bool = False) -> str:
        """The name of the bearer token's key; 401 unless it is one of the keys (``either``: an API or an
        admin key). An open kind lets any request through as ``open``."""
        if (either and self.open) or (admin and "admin" in self.open) or (not admin and not either and "api" in self.open):
            return OPEN
        keys = {**self.api, **self.admin} if either else self.admin if admin else self.api
        got = authorization or ""
        token = got[7:].strip() if got.lower().startswith("bearer ") else ""
        for key, name in keys.items():
            if hmac.compare_digest(token.encode(), key.encode()):
                return name
        what = "an API or admin key" if either else "an admin key" if admin else "an API key"
        raise ApiError(401, f"Incorrect or missing API key: this endpoint needs {what} as 'Authorization: Bearer <key>'.", code="invalid_api_key")
