"""A seeded corpus of realistic MIME mails for the benchmarks.

``generate(n, seed=1, size=10_000)`` returns ``n`` messages as bytes (LF line
endings, as they sit in a Maildir), about ``size`` bytes each on average
(each message varies between roughly 0.6x and 1.5x of it). The same
``(n, seed, size)`` always gives the same bytes: every message has its own
random generators keyed on ``(seed, index)``, so message ``i`` does not
depend on ``n`` either.

What is in it, by weight:

* ``plain``         text/plain, 8bit or quoted-printable
* ``alternative``   newsletter-style multipart/alternative, text + table HTML
* ``verification``  "confirm your address" mails: a link with a token, a
                    6-digit code in subject, text and HTML
* ``attachment``    multipart/mixed: a body plus one or two small attachments
                    (PDF-like, PNG, CSV, calendar invite), base64
* ``related``       multipart/related HTML with an inline (cid:) image

Independently, each message has a language and charset: English (us-ascii /
utf-8), German/French (iso-8859-1 / utf-8), Russian (utf-8 / koi8-r /
windows-1251), Japanese (utf-8 / iso-2022-jp / shift_jis), Chinese (utf-8 /
gb2312 / big5), with RFC 2047 encoded subjects and display names where the
text is not ASCII.

About 75 % of the messages carry a valid DKIM signature (Ed25519, selector
``bench``, a key derived from the sender's domain, so signing is deterministic
too), about 10 % a signature that does not verify (no such key), the rest
none. ``dns_zone()`` gives the records that make the checks pass: SPF (the
198.51.100.0/24 the Postfix-like traces use, and loopback), DMARC and the
DKIM keys; `bench.dns` serves it on 127.0.0.1.

Every message carries ``X-Bench-Id: <seed>.<index>``, unique in a corpus.
``To:`` names the mailbox the benchmarks deliver the message to:
``mailbox_address(assign_mailboxes(n, m, seed)[i])``.
"""

from __future__ import annotations

import base64
import hashlib
import quopri
import random
import zlib
from dataclasses import dataclass
from email.header import Header
from email.utils import format_datetime
from datetime import datetime, timedelta, timezone

__all__ = ["generate", "assign_mailboxes", "mailbox_address", "dns_zone", "DOMAIN", "KINDS"]

DOMAIN = "bench.test"
KINDS = {"plain": 20, "alternative": 30, "verification": 25, "attachment": 15, "related": 10}
BASE_DATE = datetime(2025, 1, 13, 8, 0, 0, tzinfo=timezone.utc)

# --------------------------------------------------------------------------
# Vocabulary

_EN = """the of and to in is you that it for your on with as we are this be at or from by have not
can an will all more new our about account please here if has one time get use up only other
what any us free out so when there may information which click their now see been should
order email service were would back today help can way link update secure offer price shop
team thank thanks support customer week news product latest view online store members privacy
settings notice change password reset confirm verify address message receive received subscription
invoice payment shipping delivered package tracking report summary monthly weekly daily activity
login sign device browser location security alert review event meeting schedule calendar
download available feature improvement release notes community forum reply thread comment
mention follow followers project repository issue request merge build deploy status failed
success started finished minutes hours days free trial upgrade plan billing receipt total""".split()

_DE = """für über Größe Straße schön müssen Grüße Bestätigung Konto Passwort zurücksetzen
Rechnung Lieferung Bestellung Versand Zahlung erhalten Nachricht Sicherheit Anmeldung Gerät
bitte danke herzlich willkommen Ihre Ihr Sie wir unser heute morgen Woche Angebot Preis
café été déjà très où à français reçu compte mot de passe réinitialiser commande livraison
facture paiement sécurité connexion appareil merci bienvenue votre nous notre aujourd'hui
semaine offre prix élève naïve garçon""".split()

_RU = """здравствуйте добро пожаловать ваш аккаунт пароль подтвердите адрес электронной почты
код подтверждения заказ доставка оплата счёт получено сообщение безопасность вход устройство
спасибо пожалуйста сегодня завтра неделя предложение цена скидка новости обновление
настройки уведомление изменение сброс ссылка нажмите здесь если вы не запрашивали это
письмо просто проигнорируйте команда поддержки клиентов ежемесячный отчёт активность""".split()

_JA = """こんにちは ご登録ありがとうございます アカウント パスワード 確認コード メールアドレス
ご注文 配送 お支払い 請求書 受信 メッセージ セキュリティ ログイン 端末 よろしくお願いします
本日 明日 今週 特別 価格 割引 お知らせ 更新 設定 通知 変更 再設定 リンク こちら クリック
心当たりのない場合 このメールを破棄してください サポートチーム 月次 報告 東京 会議 予定""".split()

_ZH_S = """您好 欢迎 您的 账户 密码 验证码 电子邮件 地址 订单 配送 付款 发票 收到 消息 安全
登录 设备 谢谢 请 今天 明天 本周 优惠 价格 折扣 新闻 更新 设置 通知 更改 重置 链接 点击
这里 如果 您没有 请求 请忽略 此邮件 客户 支持 团队 每月 报告 活动 北京 上海""".split()

_ZH_T = """您好 歡迎 您的 帳戶 密碼 驗證碼 電子郵件 地址 訂單 配送 付款 發票 收到 訊息 安全
登入 裝置 謝謝 請 今天 明天 本週 優惠 價格 折扣 新聞 更新 設定 通知 更改 重設 連結 點擊
這裡 如果 您沒有 請求 請忽略 此郵件 客戶 支援 團隊 每月 報告 活動 台北 香港""".split()

# (language, weight, word list, word separator, [(charset, weight)])
_LANGS = [
    ("en", 64, _EN, " ", [("us-ascii", 6), ("utf-8", 4)]),
    ("de", 8, _DE, " ", [("iso-8859-1", 5), ("utf-8", 5)]),
    ("ru", 12, _RU, " ", [("utf-8", 5), ("koi8-r", 3), ("windows-1251", 2)]),
    ("ja", 8, _JA, "", [("utf-8", 4), ("iso-2022-jp", 4), ("shift_jis", 2)]),
    ("zh", 8, None, "", [("utf-8", 4), ("gb2312", 3), ("big5", 3)]),
]

_SERVICES = [
    ("GitHub", "noreply@github.example"), ("Acme Shop", "orders@shop.acme.example"),
    ("Linear", "notifications@linear.example"), ("Stripe", "receipts@stripe.example"),
    ("Notion Team", "team@mail.notion.example"), ("Zoom", "no-reply@zoom.example"),
    ("Yandex ID", "noreply@id.yandex.example"), ("楽天市場", "order@rakuten.example"),
    ("淘宝网", "service@taobao.example"), ("Deutsche Bahn", "buchung@bahn.example"),
    ("La Poste", "ne-pas-repondre@laposte.example"), ("Slack", "feedback@slack.example"),
    ("Vercel", "notifications@vercel.example"), ("Discord", "noreply@discord.example"),
]
_FIRST = ["Alice", "Bob", "Carol", "Dmitri", "Élodie", "Jürgen", "Мария", "Иван", "さくら", "王伟", "Priya", "Omar"]
_LAST = ["Smith", "Ivanova", "Müller", "Dubois", "Tanaka", "Chen", "Kowalski", "García", "Петров", "佐藤"]

_ATTACHMENTS = [
    ("application/pdf", "invoice-{n}.pdf", "pdf"),
    ("image/png", "logo-{n}.png", "png"),
    ("text/csv", "report-{n}.csv", "csv"),
    ("text/calendar", "invite-{n}.ics", "ics"),
    ("application/zip", "export-{n}.zip", "bin"),
]


def _check_vocab() -> None:
    # A word that a legacy charset cannot encode would silently become utf-8;
    # fail loudly instead, once, at import.
    for lang, _w, words, _sep, charsets in _LANGS:
        lists = [_ZH_S, _ZH_T] if words is None else [words]
        for cs, _cw in charsets:
            if cs in ("utf-8",):
                continue
            for wl in lists:
                if lang == "zh" and ((cs == "big5") != (wl is _ZH_T)):
                    continue
                for word in wl:
                    word.encode(cs)


_check_vocab()


# --------------------------------------------------------------------------
# Public helpers


def assign_mailboxes(n: int, mailboxes: int, seed: int = 1) -> list[int]:
    """Mailbox index (0..mailboxes-1) of each of ``n`` messages: seeded, uneven like real traffic."""
    rng = random.Random(f"mtasidecar-bench-boxes:{seed}:{mailboxes}")
    return [rng.randrange(mailboxes) for _ in range(n)]


def mailbox_address(index: int, domain: str = DOMAIN) -> str:
    return f"box{index:05d}@{domain}"


def default_mailboxes(n: int) -> int:
    return max(1, n // 20)


SELECTOR = "bench"
SPF_RECORD = "v=spf1 ip4:198.51.100.0/24 ip4:127.0.0.0/8 -all"
DMARC_RECORD = "v=DMARC1; p=reject; rua=mailto:dmarc@{domain}"


def sender_domains() -> list[str]:
    return sorted({addr.split("@")[1] for _name, addr in _SERVICES})


def _dkim_seed(domain: str) -> bytes:
    return hashlib.sha256(b"mtasidecar-bench-dkim:" + domain.encode()).digest()


def dns_zone() -> dict:
    """Name → {type: [values]} for every sender domain of the corpus (see bench.dns)."""
    import nacl.signing
    zone: dict = {}
    for domain in sender_domains():
        key = nacl.signing.SigningKey(_dkim_seed(domain))
        pub = base64.b64encode(bytes(key.verify_key)).decode()
        zone[domain] = {"TXT": [SPF_RECORD], "A": ["198.51.100.10"], "MX": [(10, f"mx.{domain}")]}
        zone[f"_dmarc.{domain}"] = {"TXT": [DMARC_RECORD.format(domain=domain)]}
        zone[f"{SELECTOR}._domainkey.{domain}"] = {"TXT": [f"v=DKIM1; k=ed25519; p={pub}"]}
    return zone


def _sign(msg: bytes, domain: str) -> bytes:
    import dkim
    priv = base64.b64encode(_dkim_seed(domain))
    sig = dkim.sign(msg, SELECTOR.encode(), domain.encode(), priv, signature_algorithm=b"ed25519-sha256",
                    include_headers=[b"from", b"to", b"subject", b"date", b"message-id", b"mime-version",
                                     b"content-type"], linesep=b"\n")
    return sig + msg


def generate(n: int, seed: int = 1, size: int = 10_000, *, mailboxes: int | None = None,
             domain: str = DOMAIN) -> list[bytes]:
    """``n`` messages, deterministic for ``(seed, size, mailboxes, domain)``; see the module doc."""
    m = mailboxes or default_mailboxes(n)
    boxes = assign_mailboxes(n, m, seed)
    return [make_message(i, seed, size, mailbox_address(boxes[i], domain)) for i in range(n)]


# --------------------------------------------------------------------------
# One message


@dataclass
class _Spec:
    index: int
    seed: int
    kind: str
    lang: str
    charset: str
    words: list[str]
    sep: str
    to: str
    target: int
    dkim: str = "none"          # "valid" | "bogus" | "none"
    sender_domain: str = ""


def _pick(rng: random.Random, weighted):
    total = sum(w for _, w in weighted)
    r = rng.uniform(0, total)
    for item, w in weighted:
        r -= w
        if r <= 0:
            return item
    return weighted[-1][0]


def make_message(i: int, seed: int, size: int, to: str) -> bytes:
    rng = random.Random(f"mtasidecar-bench:{seed}:{i}")
    kind = _pick(rng, list(KINDS.items()))
    lang_row = _pick(rng, [(row, row[1]) for row in _LANGS])
    lang, _w, words, sep, charsets = lang_row
    charset = _pick(rng, charsets)
    if lang == "zh":
        words = _ZH_T if charset == "big5" else _ZH_S
    # Spread sizes around the mean: 0.6x .. 1.5x, mean ~1.0x.
    target = int(size * rng.choice((0.6, 0.7, 0.8, 0.9, 1.0, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 0.9)))
    spec = _Spec(i, seed, kind, lang, charset, words, sep, to, target)
    r = rng.random()
    spec.dkim = "valid" if r < 0.75 else "bogus" if r < 0.85 else "none"
    # Two passes: build with a guessed body length, then rescale the body so
    # the whole message lands near the target. Text and structure come from
    # separate generators, so only the body length changes between passes.
    body_chars = max(200, target // 3)
    msg = _build(spec, body_chars)
    overhead = len(_build(spec, 0))
    if len(msg) > overhead:
        body_chars = max(0, int(body_chars * (target - overhead) / (len(msg) - overhead)))
        msg = _build(spec, body_chars)
    if spec.dkim == "valid":
        msg = _sign(msg, spec.sender_domain)
    return msg


def _build(spec: _Spec, body_chars: int) -> bytes:
    srng = random.Random(f"mtasidecar-bench-struct:{spec.seed}:{spec.index}")
    trng = random.Random(f"mtasidecar-bench-text:{spec.seed}:{spec.index}")
    service, sender = srng.choice(_SERVICES)
    spec.sender_domain = sender.split("@")[1]
    date = BASE_DATE + timedelta(seconds=spec.index * 7 + srng.randrange(7))
    msgid = f"<{_hex(srng, 16)}.{spec.index}@{sender.split('@')[1]}>"
    code = f"{srng.randrange(1_000_000):06d}"
    token = _b64url(srng, 32)
    recipient_name = f"{srng.choice(_FIRST)} {srng.choice(_LAST)}"
    subject = _subject(spec, srng, code)
    boundary = f"----=_Part_{srng.randrange(10**6)}_{_hex(srng, 8)}.{spec.index}"
    text = _paragraphs(trng, spec, body_chars)

    headers = [
        ("Received", f"from mta-{srng.randrange(1, 40)}.{sender.split('@')[1]} (mta-{srng.randrange(1, 40)}."
                     f"{sender.split('@')[1]} [198.51.100.{srng.randrange(1, 254)}])\n\tby relay.example.net "
                     f"with ESMTPS id {_hex(srng, 12)}\n\tfor <{spec.to}>; {format_datetime(date)}"),
        ("From", _addr_header(service, sender)),
        ("To", _addr_header(recipient_name, spec.to)),
        ("Subject", _encode_header(subject, spec.charset)),
        ("Date", format_datetime(date)),
        ("Message-ID", msgid),
        ("MIME-Version", "1.0"),
        ("X-Bench-Id", f"{spec.seed}.{spec.index}"),
    ]
    dkim_header = _dkim(srng, sender.split("@")[1])  # drawn always: the rest stays the same
    if spec.dkim == "bogus":
        headers.insert(1, ("DKIM-Signature", dkim_header))
    if spec.kind in ("alternative", "attachment", "related") or srng.random() < 0.3:
        headers.append(("List-Unsubscribe", f"<https://{sender.split('@')[1]}/unsubscribe/{token[:20]}>, "
                                            f"<mailto:unsubscribe@{sender.split('@')[1]}>"))
    if spec.kind == "verification":
        headers.append(("X-Entity-Ref-ID", _hex(srng, 24)))
        link = f"https://{sender.split('@')[1]}/verify?token={token}&email={spec.to}"
        text_body = _verification_text(spec, code, link, text)
        html_body = _verification_html(spec, code, link, text, service)
    else:
        link = f"https://{sender.split('@')[1]}/r/{token[:16]}"
        text_body = text
        html_body = _html(spec, text, link, service)

    if spec.kind == "plain":
        top, body = _text_part(text_body, spec.charset, "plain", srng)
    elif spec.kind in ("alternative", "verification"):
        top, body = _alternative(text_body, html_body, spec.charset, boundary, srng)
    elif spec.kind == "related":
        inner_b = boundary + ".alt"
        alt_top, alt_body = _alternative(text_body, html_body.replace(
            "</h1>", '</h1><img src="cid:banner@bench" alt="" width="600">'), spec.charset, inner_b, srng)
        img = _binary(srng, "png", srng.randrange(spec.target // 20, spec.target // 8))
        parts = [(alt_top, alt_body),
                 ([("Content-Type", 'image/png; name="banner.png"'), ("Content-Transfer-Encoding", "base64"),
                   ("Content-ID", "<banner@bench>"), ("Content-Disposition", 'inline; filename="banner.png"')],
                  _b64lines(img))]
        top, body = _multipart("related", boundary, parts, extra='; type="multipart/alternative"')
    else:  # attachment
        inner_b = boundary + ".alt"
        if srng.random() < 0.5:
            first = _alternative(text_body, html_body, spec.charset, inner_b, srng)
        else:
            first = _text_part(text_body, spec.charset, "plain", srng)
        parts = [first]
        n_att = 1 if srng.random() < 0.7 else 2
        # Small attachments: together at most ~40% of the message (base64 adds a third).
        budget = max(600, int(spec.target * 0.3 / n_att))
        for k in range(n_att):
            ctype, fname, shape = srng.choice(_ATTACHMENTS)
            fname = fname.format(n=srng.randrange(10000))
            if spec.lang in ("ru", "ja", "zh") and srng.random() < 0.5:
                fname = spec.words[srng.randrange(len(spec.words))] + "-" + fname
            data = _binary(srng, shape, srng.randrange(budget // 2, budget))
            parts.append(([("Content-Type", f'{ctype}; name="{_rfc2047(fname)}"'),
                           ("Content-Transfer-Encoding", "base64"),
                           ("Content-Disposition", f"attachment; filename*=utf-8''{_pct(fname)}")],
                          _b64lines(data)))
        top, body = _multipart("mixed", boundary, parts)
    return _serialize(headers + top, body)


# --------------------------------------------------------------------------
# Pieces


def _hex(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("0123456789abcdef") for _ in range(n))


def _b64url(rng: random.Random, n: int) -> str:
    return base64.urlsafe_b64encode(rng.randbytes(n)).decode().rstrip("=")


def _dkim(rng: random.Random, domain: str) -> str:
    b = base64.b64encode(rng.randbytes(256)).decode()
    bh = base64.b64encode(rng.randbytes(32)).decode()
    sig = "\n\t ".join(b[k:k + 70] for k in range(0, len(b), 70))
    return (f"v=1; a=rsa-sha256; c=relaxed/relaxed; d={domain}; s=s{rng.randrange(2020, 2026)};\n\t"
            f"h=from:to:subject:date:message-id:mime-version:content-type;\n\tbh={bh};\n\tb={sig}")


def _rfc2047(text: str, charset: str = "utf-8") -> str:
    if text.isascii():
        return text
    return Header(text, charset if charset not in ("us-ascii",) else "utf-8").encode(maxlinelen=76)


def _encode_header(text: str, charset: str) -> str:
    if text.isascii():
        return text
    cs = charset if charset != "us-ascii" else "utf-8"
    try:
        text.encode(cs)
    except UnicodeEncodeError:
        cs = "utf-8"
    return Header(text, cs).encode(maxlinelen=76)


def _addr_header(name: str, address: str) -> str:
    if name.isascii():
        return f'"{name}" <{address}>' if any(c in name for c in ",.;:") else f"{name} <{address}>"
    return f"{Header(name, 'utf-8').encode()} <{address}>"


def _pct(text: str) -> str:
    from urllib.parse import quote
    return quote(text, safe="")


def _subject(spec: _Spec, rng: random.Random, code: str) -> str:
    w = spec.words
    topic = spec.sep.join(rng.choice(w) for _ in range(rng.randrange(3, 7)))
    if spec.kind == "verification":
        return rng.choice([
            f"Your verification code is {code}",
            f"{code} is your login code",
            f"Confirm your email address – {topic}",
            f"[{code}] {topic}",
        ])
    if spec.kind == "attachment":
        return f"Invoice #{rng.randrange(10**5, 10**6)}: {topic}"
    return topic[:1].upper() + topic[1:]


def _paragraphs(rng: random.Random, spec: _Spec, chars: int) -> str:
    out: list[str] = []
    total = 0
    w, sep = spec.words, spec.sep
    while total < chars:
        n_words = rng.randrange(20, 70)
        para = sep.join(rng.choice(w) for _ in range(n_words))
        if sep == " ":
            para = para[:1].upper() + para[1:] + "."
            # wrap at ~72 columns like mail clients do
            lines, line = [], ""
            for word in para.split(" "):
                if len(line) + len(word) + 1 > 72:
                    lines.append(line)
                    line = word
                else:
                    line = f"{line} {word}" if line else word
            lines.append(line)
            para = "\n".join(lines)
        else:
            para = "\n".join(para[k:k + 36] for k in range(0, len(para), 36)) + "。"
        out.append(para)
        total += len(para) + 2
    return "\n\n".join(out)


def _verification_text(spec: _Spec, code: str, link: str, filler: str) -> str:
    return (f"Hi,\n\nYour verification code is: {code}\n\nOr confirm your address by opening this link:\n"
            f"{link}\n\nThe code expires in 10 minutes.\n\n{filler}\n\n-- \nIf you did not ask for this, "
            f"ignore this message.\n")


def _html_escape(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _html_shell(title: str, inner: str, service: str) -> str:
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><meta name=\"viewport\" "
        "content=\"width=device-width\">\n<title>" + _html_escape(title) + "</title>\n<style>\n"
        "body{margin:0;padding:0;background:#f4f4f7;font-family:Helvetica,Arial,sans-serif}\n"
        ".wrap{width:100%;background:#f4f4f7}.card{max-width:600px;margin:0 auto;background:#fff}\n"
        ".btn{display:inline-block;padding:12px 24px;background:#3869d4;color:#fff;border-radius:4px}\n"
        "</style></head>\n<body><table class=\"wrap\" width=\"100%\" cellpadding=\"0\" cellspacing=\"0\" "
        "role=\"presentation\"><tr><td align=\"center\">\n<table class=\"card\" width=\"600\" "
        "cellpadding=\"24\" cellspacing=\"0\"><tr><td>\n<h1 style=\"font-size:22px;color:#333\">"
        + _html_escape(service) + "</h1>\n" + inner +
        "\n<p style=\"font-size:12px;color:#999\">You receive this e-mail because you have an account. "
        "<a href=\"https://example.com/settings/notifications\">Notification settings</a></p>\n"
        "</td></tr></table>\n</td></tr></table>\n<img src=\"https://t.example.com/o.gif\" width=\"1\" "
        "height=\"1\" alt=\"\"></body></html>\n"
    )


def _html(spec: _Spec, text: str, link: str, service: str) -> str:
    paras = "\n".join(f"<p style=\"font-size:16px;line-height:1.5;color:#51545e\">{_html_escape(p)}</p>"
                      for p in text.split("\n\n"))
    return _html_shell(service, paras + f"\n<p><a class=\"btn\" href=\"{link}\">Read more</a></p>", service)


def _verification_html(spec: _Spec, code: str, link: str, text: str, service: str) -> str:
    inner = (f"<p style=\"font-size:16px\">Your verification code is</p>\n<p style=\"font-size:32px;"
             f"letter-spacing:6px;font-weight:bold\">{code}</p>\n<p><a class=\"btn\" href=\"{_html_escape(link)}\""
             f">Confirm e-mail address</a></p>\n<p style=\"font-size:13px\">Or paste this link: "
             f"{_html_escape(link)}</p>\n")
    paras = "\n".join(f"<p style=\"font-size:14px;color:#51545e\">{_html_escape(p)}</p>" for p in text.split("\n\n"))
    return _html_shell(f"Verify your e-mail for {service}", inner + paras, service)


def _encode_body(text: str, charset: str, rng: random.Random) -> tuple[str, bytes]:
    """(Content-Transfer-Encoding, encoded body bytes) for ``text`` in ``charset``."""
    cs = charset
    try:
        data = text.encode(cs)
    except UnicodeEncodeError:
        cs, data = "utf-8", text.encode("utf-8")
    if cs == "iso-2022-jp" or data.isascii() and cs == "us-ascii":
        return "7bit", data
    choice = rng.random()
    if choice < 0.4:
        return "8bit", data
    if choice < 0.75:
        return "quoted-printable", quopri.encodestring(data)
    return "base64", _b64lines(data)


def _text_part(text: str, charset: str, subtype: str, rng: random.Random):
    cs = charset
    try:
        text.encode(cs)
    except UnicodeEncodeError:
        cs = "utf-8"
    if subtype == "html":
        text = text.replace('<meta charset="utf-8">', f'<meta charset="{cs}">', 1)
    cte, data = _encode_body(text, cs, rng)
    return ([("Content-Type", f"text/{subtype}; charset=\"{cs}\""), ("Content-Transfer-Encoding", cte)], data)


def _alternative(text: str, html: str, charset: str, boundary: str, rng: random.Random):
    return _multipart("alternative", boundary, [_text_part(text, charset, "plain", rng),
                                                _text_part(html, charset if charset != "us-ascii" else "utf-8",
                                                           "html", rng)])


def _multipart(subtype: str, boundary: str, parts, extra: str = ""):
    chunks = [b"This is a multi-part message in MIME format.\n"]
    for hdrs, body in parts:
        chunks.append(f"\n--{boundary}\n".encode())
        chunks.append(_header_bytes(hdrs))
        chunks.append(b"\n")
        chunks.append(body if body.endswith(b"\n") else body + b"\n")
    chunks.append(f"\n--{boundary}--\n".encode())
    return ([("Content-Type", f"multipart/{subtype};{extra}\n\tboundary=\"{boundary}\"")], b"".join(chunks))


def _b64lines(data: bytes) -> bytes:
    return base64.encodebytes(data)  # 76-column lines, LF


def _binary(rng: random.Random, shape: str, n: int) -> bytes:
    if shape == "pdf":
        body = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog /Pages 2 0 R >>\nendobj\n"
        stream = zlib.compress(rng.randbytes(n // 2) + b"BT /F1 12 Tf 72 712 Td (Invoice) Tj ET\n" * 8)
        return body + b"4 0 obj\n<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(stream) + stream + \
            b"\nendstream\nendobj\ntrailer\n<< /Root 1 0 R >>\n%%EOF\n"
    if shape == "png":
        raw = rng.randbytes(n)
        return b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x40\x00\x00\x00\x40\x08\x06\x00\x00\x00" + raw
    if shape == "csv":
        rows = ["date,item,quantity,amount"]
        while sum(len(r) + 1 for r in rows) < n:
            rows.append(f"2025-01-{rng.randrange(1, 29):02d},SKU-{rng.randrange(10**5)},{rng.randrange(1, 9)},"
                        f"{rng.randrange(100, 99999) / 100:.2f}")
        return "\r\n".join(rows).encode()
    if shape == "ics":
        uid = hashlib.sha1(rng.randbytes(8)).hexdigest()
        desc = " ".join(rng.choice(_EN) for _ in range(n // 7))
        lines = ["BEGIN:VCALENDAR", "VERSION:2.0", "PRODID:-//Bench//EN", "METHOD:REQUEST", "BEGIN:VEVENT",
                 f"UID:{uid}", "DTSTART:20250120T100000Z", "DTEND:20250120T110000Z", "SUMMARY:Weekly sync",
                 f"DESCRIPTION:{desc}", "END:VEVENT", "END:VCALENDAR"]
        return "\r\n".join(lines).encode()
    return b"PK\x03\x04" + rng.randbytes(n)


def _header_bytes(headers) -> bytes:
    return "".join(f"{k}: {v}\n" for k, v in headers).encode("ascii")


def _serialize(headers, body: bytes) -> bytes:
    return _header_bytes(headers) + b"\n" + body
