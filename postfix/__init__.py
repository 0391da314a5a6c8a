"""Postfix configuration templates, shipped as ``mtasidecar.mta.templates``.

This file only exists so the package is importable from an editable
install: setuptools' editable finder maps ``mtasidecar.mta.templates`` to
this directory but looks for an ``__init__.py`` here and does not fall back
to a namespace package under a regular parent package.
"""
