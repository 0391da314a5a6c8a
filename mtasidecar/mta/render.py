"""Render the Postfix configuration from the templates in ``postfix/``.

The templates are the files a sysadmin reads (``postfix/*.in``, shipped as the
package ``mtasidecar.mta.templates``). Placeholders are written ``@name@``:
``$name`` and ``${name}`` are Postfix's own syntax and appear in the templates
literally, so ``string.Template`` or ``str.format`` would need escaping there.

Applying the result *merges* it into an existing configuration: main.cf
settings go through ``postconf -e`` and master.cf entries through
``postconf -M``, so a sysadmin's unrelated settings stay as they are.
"""

from __future__ import annotations

import importlib.resources
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Literal

from ..config import policy_action

Delivery = Literal["maildir", "pipe"]

MAIN_CF = "main.cf"
MASTER_CF = "master.cf"
DOMAINS_MAP = "mtasidecar-domains.pcre"
MAILBOXES_MAP = "mtasidecar-mailboxes.pcre"
MAP_FILES = (DOMAINS_MAP, MAILBOXES_MAP)

# Postfix's own default for a policy server that is down is
# "451 4.3.5 Server configuration problem"; see postfix/policy.cf.in for why
# we accept instead.
DEFAULT_POLICY_ACTION = "DUNNO"

# virtual(8) refuses to deliver as a uid below virtual_minimum_uid (100).
_MIN_UID = 100
_PLACEHOLDER = re.compile(r"@([a-z_]+)@")
_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_INSTALL_HINT = "install postfix postfix-pcre (e.g. apt-get install postfix postfix-pcre)"
# Where Debian and most distributions put the Postfix programs; root's PATH
# usually has /usr/sbin, but a service manager's or a venv's may not.
_PROGRAM_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")


class PostfixError(RuntimeError):
    """Postfix is missing, misconfigured, or one of its commands failed."""


# --- templates -------------------------------------------------------------


def template_text(name: str) -> str:
    """The text of one template file, e.g. ``"main.cf.in"``."""
    return importlib.resources.files("mtasidecar.mta.templates").joinpath(name).read_text()


def fill(template: str, values: dict[str, str]) -> str:
    """Replace every ``@name@``; an unknown name is a bug, so it raises."""

    def lookup(match: re.Match[str]) -> str:
        try:
            return values[match.group(1)]
        except KeyError:
            raise KeyError(f"template placeholder @{match.group(1)}@ has no value") from None

    return _PLACEHOLDER.sub(lookup, template)


def render(
    domains: list[tuple[str, bool]],
    maildir: Path,
    *,
    uid: int,
    gid: int,
    message_size_limit: int,
    policy: str | None = None,
    policy_default_action: str = DEFAULT_POLICY_ACTION,
    socketmap: str | None = None,
    delivery: Delivery = "maildir",
    deliver_argv: list[str] | None = None,
    pipe_user: str | None = None,
) -> dict[str, str]:
    """Render the configuration: file name -> contents.

    ``domains`` are ``(name, allow_subdomains)`` pairs. ``maildir`` is the one
    catch-all Maildir (the directory holding ``new/``, ``cur/``, ``tmp/``).
    ``policy`` is a Postfix endpoint (``inet:127.0.0.1:10040``,
    ``unix:/run/mtasidecar/policy``; a bare ``host:port`` means inet);
    without it no policy lines are rendered. ``socketmap`` is the policy
    process's socketmap endpoint (same forms) for domains added at runtime;
    without it Postfix knows only the configured domains. For ``delivery="pipe"``,
    ``deliver_argv`` is the command pipe(8) runs, subcommand and options
    included (default: ``[<this installation's mtasidecar script>,
    "deliver", "--maildir", MAILDIR]``); the template appends the envelope arguments sender,
    recipient, client address and HELO. It must be executable by
    ``pipe_user`` (default: the owner of ``uid``), interpreter included.

    The keys are ``main.cf`` (settings, for ``postconf -e``), ``master.cf``
    (entries, for ``postconf -M``; empty unless delivery is ``pipe``) and the
    two maps (written next to main.cf: main.cf names them via
    ``$config_directory``).
    """
    if delivery not in ("maildir", "pipe"):
        raise ValueError(f"delivery must be 'maildir' or 'pipe', not {delivery!r}")
    maildir = _check_maildir(maildir)
    _check_uid(uid)
    if message_size_limit < 0:
        raise ValueError("message_size_limit must be >= 0 (0 means no limit)")
    rules = [(normalize_domain(name), bool(subdomains)) for name, subdomains in domains]
    main = _main_cf(maildir, uid, gid, message_size_limit, socketmap)
    master = ""
    if policy is not None:
        main += "\n" + _policy_cf(policy, policy_default_action)
    if delivery == "pipe":
        main += "\n" + template_text("pipe.cf.in")
        master = _master_cf(deliver_argv or default_deliver_argv(maildir), pipe_user or _user_name(uid))
    return {
        MAIN_CF: main,
        MASTER_CF: master,
        DOMAINS_MAP: fill(template_text("domains.pcre.in"), {"rules": _domain_rules(rules)}),
        MAILBOXES_MAP: fill(
            template_text("mailboxes.pcre.in"),
            {"rules": _mailbox_rules(rules, maildir.name) + (_runtime_mailbox_rule(maildir.name) if socketmap else "")},
        ),
    }


def _main_cf(maildir: Path, uid: int, gid: int, message_size_limit: int, socketmap: str | None) -> str:
    table = f"socketmap:{policy_endpoint(socketmap)}" if socketmap else ""
    return fill(
        template_text("main.cf.in"),
        {
            "mailbox_base": str(maildir.parent),
            "uid": str(uid),
            "gid": str(gid),
            "message_size_limit": str(message_size_limit),
            "runtime_domains": f", {table}:domain" if table else "",
        },
    )


def _policy_cf(policy: str, default_action: str) -> str:
    return fill(template_text("policy.cf.in"), {"policy_entry": policy_entry(policy, default_action)})


def _master_cf(deliver_argv: list[str], pipe_user: str) -> str:
    return fill(
        template_text("master.cf.in"),
        {"pipe_user": _pipe_user(pipe_user), "deliver_command": _pipe_command(deliver_argv)},
    )


# --- domains and maps ------------------------------------------------------


def normalize_domain(name: str) -> str:
    """Lowercase ASCII (IDNA) form of a domain name; ValueError if invalid."""
    name = name.strip().rstrip(".").lower()
    try:
        ascii_name = name.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise ValueError(f"invalid domain name {name!r}: {exc}") from None
    labels = ascii_name.split(".")
    if len(labels) < 2 or not all(_LABEL.match(label) for label in labels):
        raise ValueError(f"invalid domain name {name!r}")
    return ascii_name


def domain_regex(domain: str, subdomains: bool, subdomain_part: str = ".+") -> str:
    """The PCRE for a domain, without anchors.

    ``(.+\\.)?`` requires a dot before the domain, so ``evilexample.test``
    does not match ``example.test``; the caller anchors the end, so
    ``example.test.evil.com`` does not match either.
    """
    escaped = re.escape(domain)
    return rf"({subdomain_part}\.)?{escaped}" if subdomains else escaped


def _domain_rules(domains: list[tuple[str, bool]]) -> str:
    return "\n".join(f"/^{domain_regex(d, sub)}$/ OK" for d, sub in domains)


def _runtime_mailbox_rule(mailbox: str) -> str:
    # virtual(8) refuses socketmap tables for virtual_mailbox_maps (they name
    # files it writes as root), so the domains added at runtime get this rule:
    # every address that reaches virtual(8) is in virtual_mailbox_domains
    # already (the static map or our socketmap), so matching any address here
    # accepts nothing those did not.
    return f"\n# Domains added at runtime (accepted through the socketmap in virtual_mailbox_domains):\n/@/ {mailbox}/"


def _mailbox_rules(domains: list[tuple[str, bool]], mailbox: str) -> str:
    # The key is the whole address; [^@]+ keeps the subdomain part from
    # reaching into the local part.
    return "\n".join(
        f"/@{domain_regex(d, sub, '[^@]+')}$/ {mailbox}/" for d, sub in domains
    )


# --- argument checks -------------------------------------------------------


def policy_endpoint(policy: str) -> str:
    """A Postfix policy endpoint; ``host:port`` becomes ``inet:host:port``."""
    policy = _one_line(policy, "policy")
    if any(c.isspace() or c == "," for c in policy):
        raise ValueError(f"policy endpoint must not contain spaces or commas: {policy!r}")
    if not policy.startswith(("inet:", "unix:")):
        policy = "inet:" + policy
    return policy


def default_deliver_argv(maildir: Path) -> list[str]:
    """``mtasidecar deliver --maildir DIR``, with the script installed next to this Python."""
    script = Path(sys.executable).with_name("mtasidecar")
    program = str(script) if script.exists() else shutil.which("mtasidecar") or "mtasidecar"
    return [program, "deliver", "--maildir", str(maildir)]


def _pipe_command(argv: list[str]) -> str:
    # pipe(8) splits argv= on whitespace and expands $macros, so neither may
    # appear inside one of our arguments.
    for arg in argv:
        if not arg or any(c.isspace() or c == "$" for c in arg):
            raise ValueError(f"pipe argument must be non-empty, without spaces or '$': {arg!r}")
    return " ".join(argv)


def _check_maildir(maildir: Path) -> Path:
    maildir = Path(maildir)
    if not maildir.is_absolute():
        raise ValueError(f"maildir must be an absolute path: {maildir}")
    # main.cf expands $ and a map result ends at whitespace.
    if any(c.isspace() or c == "$" for c in str(maildir)):
        raise ValueError(f"maildir path must not contain spaces or '$': {maildir}")
    if maildir.parent == maildir:
        raise ValueError("maildir must not be /")
    return maildir


def _check_uid(uid: int) -> None:
    if uid < _MIN_UID:
        raise ValueError(
            f"delivery uid {uid} is below Postfix's virtual_minimum_uid ({_MIN_UID}); "
            "use a dedicated system user such as 'mtasidecar'"
        )


def _pipe_user(name: str) -> str:
    if name == "root" or not re.fullmatch(r"[a-z_][a-z0-9_.-]*\$?", name):
        raise ValueError(f"pipe_user must be an unprivileged user name, not {name!r}")
    return name


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        raise ValueError(f"uid {uid} has no user name; pass pipe_user") from None


def _one_line(value: str, what: str) -> str:
    value = value.strip()
    if not value or "\n" in value:
        raise ValueError(f"{what} must be a non-empty single line")
    return value


# --- parsing rendered files ------------------------------------------------


def _logical_lines(text: str) -> list[str]:
    """Postfix's rule: a line starting with whitespace continues the last one."""
    lines: list[str] = []
    for raw in text.splitlines():
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        if raw[0].isspace() and lines:
            lines[-1] += " " + raw.strip()
        else:
            lines.append(raw.strip())
    return lines


def main_cf_settings(text: str) -> dict[str, str]:
    """``name = value`` lines of a main.cf (fragment) as a dict."""
    settings = {}
    for line in _logical_lines(text):
        name, sep, value = line.partition("=")
        if not sep:
            raise ValueError(f"not a main.cf setting: {line!r}")
        settings[name.strip()] = value.strip()
    return settings


def master_cf_entries(text: str) -> dict[str, str]:
    """master.cf entries as ``{"service/type": "whole entry on one line"}``."""
    entries = {}
    for line in _logical_lines(text):
        fields = line.split()
        if len(fields) < 8:
            raise ValueError(f"not a master.cf entry: {line!r}")
        entries[f"{fields[0]}/{fields[1]}"] = " ".join(fields)
    return entries


# --- writing and applying --------------------------------------------------


def write_config(rendered: dict[str, str], config_dir: Path) -> list[Path]:
    """Write the maps into ``config_dir`` (where main.cf expects them).

    Each file is replaced atomically, so a Postfix process that opens a map
    during a reload never reads half of it.
    """
    config_dir = Path(config_dir)
    written = []
    for name in MAP_FILES:
        path = config_dir / name
        _write_atomic(path, rendered[name])
        written.append(path)
    return written


# Lists where our entry joins an administrator's instead of replacing it: a
# Postfix that also serves other mail keeps its own recipient checks.
MERGED_LISTS = ("smtpd_recipient_restrictions",)

# Our check_policy_service entry carries its own default_action (Postfix >= 3.0
# per-entry attributes), so an administrator's other policy services keep the
# global smtpd_policy_service_default_action; and it names itself with
# policy_context (>= 3.1), so `postfix apply` can find it again to replace or
# remove it. Entries rendered before this marker are the plain
# "check_policy_service <endpoint>".
POLICY_CONTEXT = "mtasidecar"
_OURS = re.compile(rf"\bpolicy_context\s*=\s*{POLICY_CONTEXT}\b")
_ENDPOINT = re.compile(r"check_policy_service\s*\{\s*([^\s,{}]+)")


def policy_entry(endpoint: str, default_action: str) -> str:
    """Our ``check_policy_service`` restriction, default action and marker included."""
    return (f"check_policy_service {{ {policy_endpoint(endpoint)}, "
            f"{{ default_action = {policy_action(default_action)} }}, policy_context={POLICY_CONTEXT} }}")


def _list_items(value: str) -> list[tuple[int, int]]:
    """(start, end) of each item of a Postfix list: words separated by whitespace
    or commas, a ``{ ... }`` group (which may hold both) being one item."""
    items, depth, start = [], 0, None
    for i, ch in enumerate(value):
        if depth == 0 and (ch.isspace() or ch == ","):
            if start is not None:
                items.append((start, i))
                start = None
            continue
        if start is None:
            start = i
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth = max(0, depth - 1)
    if start is not None:
        items.append((start, len(value)))
    return items


def _norm(item: str) -> str:
    """An item with the spacing around braces, commas and "=" made uniform."""
    for ch in "{},=":
        item = item.replace(ch, f" {ch} ")
    return " ".join(item.split())


def _our_spans(value: str, ours: str | None = None) -> list[tuple[int, int]]:
    """Spans of our check_policy_service entries in ``value``, each with the
    separators after it: marked ones, and the pre-marker plain form of ``ours``."""
    items = _list_items(value)
    endpoint = _ENDPOINT.match(ours) if ours else None
    legacy = endpoint.group(1) if endpoint else None
    spans = []
    for k, (start, end) in enumerate(items[:-1]):
        if value[start:end] != "check_policy_service":
            continue
        arg = value[items[k + 1][0]:items[k + 1][1]]
        if _OURS.search(arg) or (legacy is not None and arg == legacy):
            stop = items[k + 2][0] if k + 2 < len(items) else len(value)
            spans.append((start, stop))
    return spans


def list_contains(current: str, ours: str) -> bool:
    """Is ``ours`` (a restriction and its argument) in the list ``current``, as written?"""
    items = [_norm(current[a:b]) for a, b in _list_items(current)]
    want = [_norm(ours[a:b]) for a, b in _list_items(ours)]
    return any(items[i:i + len(want)] == want for i in range(len(items) - len(want) + 1))


def without_ours(current: str, ours: str | None = None) -> str:
    """``current`` with our entries (see _our_spans) taken out, the rest as written."""
    kept, at = [], 0
    for start, stop in _our_spans(current, ours):
        kept.append(current[at:start])
        at = stop
    kept.append(current[at:])
    return " ".join("".join(kept).split()).strip(" ,")


def merge_list(current: str, ours: str) -> str:
    """``ours`` in front of an administrator's list (our check refuses unknown addresses of
    our domains and answers DUNNO for every other), once: an older entry of ours goes."""
    current = " ".join(current.split())  # postconf -e takes one line
    if list_contains(current, ours) and len(_our_spans(current, ours)) == 1:
        return current
    rest = without_ours(current, ours)
    return f"{ours}, {rest}" if rest else ours


def apply_config(rendered: dict[str, str], config_dir: Path) -> None:
    """Merge the rendered configuration into the Postfix in ``config_dir``.

    Writes the maps, sets main.cf settings with ``postconf -e`` and master.cf
    entries with ``postconf -M``; everything else in main.cf and master.cf is
    kept, and our entries join the lists in MERGED_LISTS (and leave them when
    the policy service is off). Run ``postfix reload`` afterwards for a
    running Postfix.
    """
    config_dir = Path(config_dir)
    require_pcre(config_dir)
    settings = main_cf_settings(rendered[MAIN_CF])
    if any(_OURS.search(value) for value in settings.values()):
        require_version(config_dir, (3, 1), "our check_policy_service { ..., policy_context=... } entry")
    write_config(rendered, config_dir)
    unset = []
    for name in MERGED_LISTS:
        current = postconf(config_dir, "-nh", name)
        if name in settings:
            settings[name] = merge_list(current, settings[name])
        elif _our_spans(current):  # policy service off now: our entry goes
            rest = without_ours(current)
            if rest:
                settings[name] = rest
            else:
                unset.append(name)
    postconf(config_dir, "-e", *(f"{name}={value}" for name, value in settings.items()))
    if unset:
        postconf(config_dir, "-X", *unset)
    for key, entry in master_cf_entries(rendered[MASTER_CF]).items():
        postconf(config_dir, "-M", f"{key}={entry}")


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # Postfix daemons read maps as the postfix user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- running Postfix tools -------------------------------------------------


def find_program(name: str) -> str:
    """Absolute path of a Postfix program, or a PostfixError saying what to install."""
    found = shutil.which(name)
    for directory in _PROGRAM_DIRS:
        if found:
            break
        candidate = Path(directory, name)
        if candidate.is_file() and os.access(candidate, os.X_OK):
            found = str(candidate)
    if not found:
        raise PostfixError(f"{name} not found: {_INSTALL_HINT}")
    return found


def postconf(config_dir: Path, *args: str) -> str:
    """Run ``postconf -c config_dir ARGS``; its stdout, or PostfixError."""
    output = run_tool("postconf", "-c", str(config_dir), *args)
    if _is_edit(args):
        settle(config_dir)
    return output


def _is_edit(args: tuple[str, ...]) -> bool:
    """Whether these postconf arguments rewrite main.cf or master.cf."""
    options = {a for a in args if a.startswith("-")}
    if options & {"-e", "-X", "-#"} or any(o.endswith("X") for o in options):
        return True
    # -M, -F, -P list entries unless given name=value
    return bool(options & {"-M", "-F", "-P"}) and any("=" in a for a in args)


def settle(config_dir: Path) -> None:
    """Backdate main.cf and master.cf so Postfix reads them without pausing.

    Every Postfix program refuses to read a main.cf or master.cf changed
    within the last second or so: it sleeps 0.3 s at a time until the file
    has "cooled down" (load_file.c), which protects against half-saved edits
    and cost about 2 s per command right after an edit. postconf and we
    write these files by renaming complete ones into place, so there is
    nothing to protect against.
    """
    past = time.time() - 3
    for name in (MAIN_CF, MASTER_CF):
        path = Path(config_dir, name)
        if path.exists():
            os.utime(path, (past, past))


def run_tool(program: str, *args: str, timeout: float = 60) -> str:
    command = [find_program(program), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip()
        raise PostfixError(f"{' '.join(command)} failed ({result.returncode}): {detail}")
    return result.stdout


def require_pcre(config_dir: Path) -> None:
    """PostfixError unless this Postfix can read pcre: maps (postfix-pcre)."""
    if "pcre" not in postconf(config_dir, "-m").split():
        raise PostfixError(f"Postfix has no pcre map support: {_INSTALL_HINT}")


def require_version(config_dir: Path, minimum: tuple[int, int], why: str) -> None:
    """PostfixError if this Postfix is older than ``minimum``: an smtpd that
    cannot parse main.cf exits on every connection, so refuse before writing."""
    text = postconf(config_dir, "-h", "mail_version").strip()
    have = tuple(int(part) for part in re.findall(r"\d+", text)[:2])
    if have < minimum:
        raise PostfixError(f"Postfix {text} is too old for {why}: it needs {minimum[0]}.{minimum[1]} or later")
