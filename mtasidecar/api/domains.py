"""Domains: everyone may list the active ones; the operator adds, changes and disables domains at runtime.

    GET   /api/v1/domains                   active domains: name, mode, subdomains
    GET   /api/v1/admin/domains             operator: every domain, disabled ones too, with settings
    POST  /api/v1/admin/domains             operator: add one {name, mode, subdomains, default_ttl, ...}
    GET   /api/v1/admin/domains/{name}      operator: one domain
    PATCH /api/v1/admin/domains/{name}      operator: {"active": false} disables; other fields change settings

A runtime domain takes the settings a ``[[domains]]`` table takes, checked
the same way (config.Settings.runtime_domain). Postfix learns about it from
the policy process's socketmap (postfix/main.cf.in), the other processes
from the database (mtasidecar/domains.py). Domains from the configuration
file are changed there, not here: PATCH answers 409 for them.
"""

from __future__ import annotations

import asyncio
import dataclasses

import falcon

from ..config import ConfigError, DomainSettings
from ..domains import DomainRegistry, from_row, settings_json
from ..store import Store
from . import views
from .access import Access
from .errors import ApiError, not_found, unprocessable
from .inputs import json_body

run = asyncio.to_thread

SETTINGS_FIELDS = tuple(f.name for f in dataclasses.fields(DomainSettings) if f.name != "name")


def short_view(row) -> dict:
    return {"id": views.format_id(row.id), "name": row.name, "subdomains": row.subdomains, "mode": row.mode}


def full_view(row, settings: DomainSettings | None) -> dict:
    """The operator's view: where the domain comes from, whether it is served, every setting."""
    doc = dict(short_view(row), active=row.active, source=row.source, created_at=views.format_time(row.created_at))
    if settings is not None:
        doc["settings"] = {k: v for k, v in dataclasses.asdict(settings).items() if k != "name"}
    return doc


class _Base:
    def __init__(self, store: Store, access: Access, registry: DomainRegistry):
        self.store, self.access, self.registry = store, access, registry

    def _settings_of(self, row) -> DomainSettings | None:
        if row.source == "api":
            return from_row(self.registry.settings, row)
        return self.registry.settings.domain(row.name)

    def _full(self, row) -> dict:
        return full_view(row, self._settings_of(row))

    def _build(self, data: dict) -> DomainSettings:
        try:
            return self.registry.settings.runtime_domain(data)
        except ConfigError as exc:
            raise unprocessable(str(exc), "invalid_domain") from None


class PublicDomains:
    """GET /api/v1/domains"""

    def __init__(self, store: Store):
        self.store = store

    async def on_get(self, req, resp):
        rows = await run(self.store.list_domains)
        resp.media = {"items": [short_view(r) for r in rows]}


class AdminDomains(_Base):
    """GET / POST /api/v1/admin/domains (operator)"""

    async def on_get(self, req, resp):
        self.access.require_operator(req)
        rows = await run(self.store.all_domains)
        resp.media = {"items": [self._full(r) for r in rows]}

    async def on_post(self, req, resp):
        self.access.require_operator(req)
        body = await json_body(req)
        domain = self._build(body)
        row = await run(self.store.add_domain, domain.name, domain.subdomains, domain.mode, settings_json(domain))
        if row is None:
            raise ApiError(409, "domain_exists", f"{domain.name} exists already "
                           "(PATCH /api/v1/admin/domains/{name} changes or re-enables a runtime domain)")
        self.registry.invalidate()
        resp.status = falcon.HTTP_201
        resp.media = self._full(row)


class AdminDomainItem(_Base):
    """GET / PATCH /api/v1/admin/domains/{name} (operator)"""

    async def _row(self, name: str):
        row = await run(self.store.domain, name.strip().rstrip(".").lower())
        if row is None:
            raise not_found(f"no domain {name}", "domain_not_found")
        return row

    async def on_get(self, req, resp, name):
        self.access.require_operator(req)
        resp.media = self._full(await self._row(name))

    async def on_patch(self, req, resp, name):
        self.access.require_operator(req)
        row = await self._row(name)
        if row.source != "api":
            raise ApiError(409, "configured_domain", f"{row.name} comes from the configuration file; change it there")
        body = await json_body(req)
        if "name" in body:
            raise unprocessable("a domain cannot be renamed; add the new name and disable this one", "invalid_domain")
        unknown = set(body) - set(SETTINGS_FIELDS) - {"active"}
        if unknown:
            raise unprocessable(f"unknown field(s): {', '.join(sorted(unknown))}", "unknown_field")
        active = body.pop("active", row.active)
        if not isinstance(active, bool):
            raise unprocessable("active must be true or false", "invalid_domain")
        current = self._settings_of(row)
        base = dataclasses.asdict(current) if current else {"name": row.name}
        domain = self._build(dict(base, **body))
        row = await run(self.store.update_domain, row.name, active=active, subdomains=domain.subdomains,
                        mode=domain.mode, settings=settings_json(domain))
        if row is None:  # a restart with this name in the configuration took it over meanwhile
            raise ApiError(409, "configured_domain", f"{name} comes from the configuration file; change it there")
        self.registry.invalidate()
        resp.media = self._full(row)
