"""Bearer keys: API keys for /v1 (and the schema), admin keys for /admin. None configured: open."""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass

from icl_router.config import AuthConfig
from icl_router.serving.protocol import ApiError


def _keys(listed: list[str], env: str | None) -> tuple[str, ...]:
    return (*listed, *(k.strip() for k in os.environ.get(env or "", "").split(",") if k.strip()))


@dataclass(frozen=True)
class Keys:
    api: tuple[str, ...]
    admin: tuple[str, ...]

    @classmethod
    def from_config(cls, auth: AuthConfig) -> Keys:
        """Read in the replica: ``*_env`` variables are the replica's environment, not the driver's."""
        return cls(_keys(auth.api_keys, auth.api_keys_env), _keys(auth.admin_keys, auth.admin_keys_env))

    def check(self, authorization: str | None, *, admin: bool = False, either: bool = False) -> None:
        """Raise 401 unless the bearer token is one of the keys (``either``: an API or an admin key)."""
        keys = (*self.api, *self.admin) if either else self.admin if admin else self.api
        if not keys:
            return
        got = authorization or ""
        token = got[7:].strip() if got.lower().startswith("bearer ") else ""
        if not any(hmac.compare_digest(token.encode(), k.encode()) for k in keys):
            what = "an API or admin key" if either else "an admin key" if admin else "an API key"
            raise ApiError(401, f"Incorrect or missing API key: this endpoint needs {what} as 'Authorization: Bearer <key>'.", code="invalid_api_key")
