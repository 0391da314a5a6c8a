"""README.md's examples must stay true."""

import tomllib
from pathlib import Path

from mtasidecar.config import load

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_toml_example_is_a_valid_configuration(tmp_path):
    text = README.read_text()
    block = text.split("```toml\n", 1)[1].split("```", 1)[0]
    tomllib.loads(block)  # TOML syntax
    path = tmp_path / "config.toml"
    path.write_text(block)
    settings = load(path, environ={})
    assert settings.domains[0].name == "example.com" and settings.domains[0].mode == "private"


def test_readme_gives_the_two_commands():
    text = README.read_text()
    assert "bash scripts/install-deps.sh && .venv/bin/mtasidecar dev" in text
    assert "bash scripts/install-deps.sh --test && .venv/bin/python -m pytest -q" in text
    ci = (README.parent / ".ci" / "run").read_text()
    assert "scripts/install-deps.sh --test" in ci and "python -m pytest -q" in ci
