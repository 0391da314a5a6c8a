"""The API application: one factory wires resources to a Store.

Falcon's ASGI flavour runs under gunicorn's asgi worker, so long waits for
new mail (issue: waiting without polling) cost a coroutine, not a thread.
Database calls run in a thread pool (``asyncio.to_thread``), one whole
transaction per call.
"""

from __future__ import annotations

import json
from importlib import resources

import falcon
import falcon.asgi

from ..config import Settings
from ..domains import DomainRegistry
from ..store import Store
from . import errors, mailtm, webhooks
from .access import Access
from .domains import AdminDomainItem, AdminDomains, PublicDomains
from .mailboxes import AdminMailboxes, AdminStats, MailboxItem, Mailboxes
from .messages import (Health, MessageAttachment, MessageEvents, MessageExtract, MessageItem, MessageList,
                       MessageRaw)
from .waiting import Watcher

API = "/api/v1"


class OpenApi:
    def __init__(self):
        self.document = json.loads(resources.files(__package__).joinpath("openapi.json").read_text())

    async def on_get(self, req, resp):
        resp.media = self.document


def create_app(settings: Settings, store: Store | None = None) -> falcon.asgi.App:
    store = store or Store(settings.database_url)
    domains = DomainRegistry(settings, store)
    access = Access(store, settings, domains)
    watcher = Watcher(store)
    app = falcon.asgi.App(cors_enable=False)
    app.req_options.strip_url_path_trailing_slash = True
    app.set_error_serializer(errors.serialize)
    app.add_error_handler(Exception, errors.unexpected)

    app.add_route("/healthz", Health(store))
    app.add_route(f"{API}/openapi.json", OpenApi())
    app.add_route(f"{API}/domains", PublicDomains(store))
    app.add_route(f"{API}/mailboxes", Mailboxes(store, settings, access))
    mb = f"{API}/mailboxes/{{address}}"
    app.add_route(mb, MailboxItem(store, settings, access))
    app.add_route(f"{mb}/messages", MessageList(store, access, settings.api.max_page_size, watcher))
    app.add_route(f"{mb}/events", MessageEvents(store, access, watcher))
    app.add_route(f"{mb}/messages/{{message_id}}", MessageItem(store, access))
    app.add_route(f"{mb}/messages/{{message_id}}/raw", MessageRaw(store, access))
    app.add_route(f"{mb}/messages/{{message_id}}/links", MessageExtract(store, access, "links"))
    app.add_route(f"{mb}/messages/{{message_id}}/codes", MessageExtract(store, access, "codes"))
    app.add_route(f"{mb}/messages/{{message_id}}/attachments/{{index}}", MessageAttachment(store, access))
    app.add_route(f"{API}/admin/mailboxes", AdminMailboxes(store, access, settings.api.max_page_size))
    app.add_route(f"{API}/admin/stats", AdminStats(store, access))
    app.add_route(f"{API}/admin/domains", AdminDomains(store, access, domains))
    app.add_route(f"{API}/admin/domains/{{name}}", AdminDomainItem(store, access, domains))
    webhooks.register(app, store, settings, access)
    # mail.tm's API at the root: a mail.tm client only changes its base URL.
    mailtm.register(app, store, settings, access, watcher)
    return app
