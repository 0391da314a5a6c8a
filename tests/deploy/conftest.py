"""Deployment tests (systemd units, the Ansible role) run only when asked:

    MTASIDECAR_DEPLOY_TESTS=1 python -m pytest -q tests/deploy

The real run of the role changes this machine (the system Postfix in
/etc/postfix, /opt/mtasidecar, /etc/mtasidecar, /var/lib/mtasidecar): meant
for a throwaway CI machine, as root.
"""

from __future__ import annotations

import os

import pytest

ENABLED = os.environ.get("MTASIDECAR_DEPLOY_TESTS") == "1"


def pytest_configure(config):
    config.addinivalue_line("markers", "deploy: deployment tests (set MTASIDECAR_DEPLOY_TESTS=1 to run)")


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="deployment tests: set MTASIDECAR_DEPLOY_TESTS=1")
    for item in items:
        if "deploy" in item.keywords and not ENABLED:
            item.add_marker(skip)
