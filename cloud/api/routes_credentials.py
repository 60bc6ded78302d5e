"""``/credentials``: the registry credentials deployments name, as ``edgectl credential`` sets them.

``PUT /credentials/{name}`` creates or rotates one (the devices that use it get it re-sealed in a
new desired state, published at once); no answer ever carries a password.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from cloud.api.routing import Body, Route, call, json_body, reply, services
from cloud.fleet.credentials import CredentialView
from cloud.fleet.results import PublishReport


class CredentialBody(BaseModel):
    """``PUT /credentials/{name}``: the registry, the username and the password (write-only)."""

    model_config = ConfigDict(extra="forbid")

    registry: str = Field(min_length=1, description="HOST[:PORT] of the registry")
    username: str = Field(min_length=1)
    password: SecretStr = Field(description="never returned nor logged")


@dataclass(frozen=True)
class CredentialSet:
    """What setting a credential did."""

    name: str
    revision: int
    created: bool
    new_generations: int
    publish: PublishReport


async def set_credential(request: web.Request) -> web.Response:
    """Create or rotate a registry credential."""
    s = services(request)
    name = request.match_info["name"]
    body = await json_body(request, CredentialBody)
    revision, created, new, report = await call(
        s.fleet.set_credential,
        name,
        body.registry,
        body.username,
        body.password.get_secret_value(),
        endpoint=s.endpoint,
    )
    return reply(CredentialSet(name, revision, created, new, report), 201 if created else 200)


async def list_credentials(request: web.Request) -> web.Response:
    """Every registry credential (never a password), with the deployments that use it."""
    return reply(await call(services(request).fleet.credentials))


@dataclass(frozen=True)
class RemovedCredential:
    """A deleted credential."""

    removed: str


async def remove_credential(request: web.Request) -> web.Response:
    """Delete a credential no deployment lists (409 while one does)."""
    name = request.match_info["name"]
    await call(services(request).fleet.remove_credential, name)
    return reply(RemovedCredential(name))


ROUTES = (
    Route(
        "GET",
        "/credentials",
        list_credentials,
        "List registry credentials",
        "credentials",
        response=list[CredentialView],
    ),
    Route(
        "PUT",
        "/credentials/{name}",
        set_credential,
        "Create or rotate a registry credential",
        "credentials",
        response=CredentialSet,
        status=201,
        also=(200,),
        body=Body({"application/json": {"schema": CredentialBody}}),
        errors=(400, 415),
    ),
    Route(
        "DELETE",
        "/credentials/{name}",
        remove_credential,
        "Delete a registry credential",
        "credentials",
        response=RemovedCredential,
        errors=(404, 409),
    ),
)
