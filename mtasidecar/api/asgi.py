"""Entry point for gunicorn: ``gunicorn -k asgi mtasidecar.api.asgi:app``.

Settings come from MTASIDECAR_* variables (and $MTASIDECAR_CONFIG), which the
CLI sets for the workers it starts. The schema is created by the CLI before
gunicorn starts, never here: workers racing at import time would collide.
"""

from ..config import load
from .app import create_app

app = create_app(load())
