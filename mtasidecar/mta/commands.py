"""`mtasidecar postfix show|apply`: our Postfix settings for a system Postfix.

``show`` prints what would be merged; ``apply`` merges it into the Postfix
configuration directory with postconf (an administrator's other settings
stay as they are) and writes the two maps beside main.cf.
"""

from __future__ import annotations

import sys

from ..config import Settings
from .instance import ensure_user
from .render import MAIN_CF, MASTER_CF, MAP_FILES, PostfixError, apply_config, render


def rendered_for(settings: Settings, *, create_user: bool) -> dict[str, str]:
    if create_user:
        uid, gid = ensure_user()
    else:
        import pwd
        try:
            entry = pwd.getpwnam("mtasidecar")
            uid, gid = entry.pw_uid, entry.pw_gid
        except KeyError:
            uid = gid = 5000  # shown only; `apply` creates the real user
    from ..policy import postfix_endpoints
    maildir = settings.maildir_path.absolute()
    # With a policy address set, Postfix asks `mtasidecar policy` at RCPT:
    # that is what refuses unknown addresses on private domains.
    policy, socketmap = postfix_endpoints(settings.policy)
    return render([(d.name, d.subdomains) for d in settings.domains], maildir, uid=uid, gid=gid,
                  message_size_limit=settings.smtp.message_size_limit, delivery=settings.smtp.delivery,
                  deliver_argv=[sys.executable, "-m", "mtasidecar", "deliver", "--maildir", str(maildir)],
                  policy=policy, policy_default_action=settings.policy.default_action, socketmap=socketmap)


def postfix_command(settings: Settings, args) -> int:
    if not settings.domains:
        print("mtasidecar postfix: no domains configured (set [[domains]] or MTASIDECAR_DOMAINS)",
              file=sys.stderr)
        return 2
    try:
        rendered = rendered_for(settings, create_user=args.action == "apply")
        if args.action == "show":
            for name in (MAIN_CF, MASTER_CF, *MAP_FILES):
                if rendered[name].strip():
                    print(f"# ---- {name}\n{rendered[name].rstrip()}\n")
            return 0
        apply_config(rendered, args.config_dir)
    except PostfixError as exc:
        print(f"mtasidecar postfix: {exc}", file=sys.stderr)
        return 1
    print(f"merged into {args.config_dir}; run `postfix reload` (or start Postfix)")
    return 0
