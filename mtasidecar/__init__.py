"""mtasidecar: disposable e-mail on your own domain, Postfix in front."""

__version__ = "0.1.0"
