"""Reading Postfix's delivery trace (mtasidecar.mail.envelope)."""

import pytest

from mtasidecar.mail.envelope import (
    Envelope,
    header_block_end,
    header_text,
    read_trace,
    split_header_block,
)


def mail(*lines: str, body: str = "Hello.\n", eol: str = "\n") -> bytes:
    return (eol.join(lines) + eol + eol + body).encode("utf-8")


TRACE = (
    "Return-Path: <Sender@Example.org>",
    "X-Original-To: Anything@Example.test",
    "Delivered-To: anything@example.test",
    "Received: from mail.example.org (mail.example.org [203.0.113.5])",
    "\tby mx.example.test (Postfix) with ESMTP id 4ABCDEF123",
    "\tfor <anything@example.test>; Mon, 13 Jan 2025 10:00:00 +0000 (UTC)",
)
SENDER_HEADERS = (
    "From: Sender <sender@example.org>",
    "To: anything@example.test",
    "Subject: hi",
)


def test_normal_postfix_trace():
    env = read_trace(mail(*TRACE, *SENDER_HEADERS))
    assert env == Envelope(
        sender="Sender@Example.org",  # the envelope sender keeps its case
        recipient="anything@example.test",
        original_recipient="anything@example.test",  # lower-cased
        client_ip="203.0.113.5",
        client_helo="mail.example.org",
        client_rdns="mail.example.org",
        queue_id="4ABCDEF123",
    )
    assert env.to_dict()["client_ip"] == "203.0.113.5"


def test_crlf_line_endings():
    env = read_trace(mail(*TRACE, *SENDER_HEADERS, eol="\r\n"))
    assert env.recipient == "anything@example.test"
    assert env.client_ip == "203.0.113.5"
    assert env.queue_id == "4ABCDEF123"


@pytest.mark.parametrize(
    "literal, expected",
    [
        ("IPv6:::1", "::1"),
        ("IPv6:2001:DB8:0:0::1", "2001:db8::1"),  # normalised
        ("ipv6:2001:db8::5", "2001:db8::5"),
    ],
)
def test_ipv6_client(literal, expected):
    env = read_trace(mail(
        "Return-Path: <a@b.example>",
        "Delivered-To: x@example.test",
        f"Received: from localhost (localhost [{literal}])",
        "\tby mx.example.test (Postfix) with ESMTP id 4Xy7Kq2Zz9zB",
        "\tfor <x@example.test>; Mon, 13 Jan 2025 10:00:00 +0000 (UTC)",
    ))
    assert env.client_ip == expected
    assert env.client_helo == "localhost"
    assert env.queue_id == "4Xy7Kq2Zz9zB"  # long queue ids are mixed-case


def test_folded_received_with_tls_comment():
    # Postfix folds over several lines and puts the TLS details (which
    # contain "with") between the client and "by".
    env = read_trace(mail(
        "Return-Path: <bounce@list.example.org>",
        "X-Original-To: qa+1@sub.example.test",
        "Delivered-To: qa+1@sub.example.test",
        "Received: from",
        "  out.example.org",
        "   (out-7.example.org",
        "\t[198.51.100.7])",
        "\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)",
        "\t key-exchange X25519 server-signature RSA-PSS (2048 bits) server-digest SHA256)",
        "\t(No client certificate requested)",
        "\tby mx.example.test (Postfix) with ESMTPS id 7F00A1C0042",
        "\tfor <qa+1@sub.example.test>; Mon, 13 Jan 2025 10:00:00 +0000 (UTC)",
    ))
    assert env.client_ip == "198.51.100.7"
    assert env.client_helo == "out.example.org"
    assert env.client_rdns == "out-7.example.org"
    assert env.queue_id == "7F00A1C0042"
    assert env.recipient == "qa+1@sub.example.test"


def test_unknown_rdns_and_ip_literal_helo():
    env = read_trace(mail(
        "Return-Path: <a@b.example>",
        "Delivered-To: x@example.test",
        "Received: from [192.0.2.9] (unknown [192.0.2.9])",
        "\tby mx.example.test (Postfix) with SMTP id 1A2B3C",
        "\tfor <x@example.test>; Mon, 13 Jan 2025 10:00:00 +0000 (UTC)",
    ))
    assert env.client_rdns is None
    assert env.client_ip == "192.0.2.9"
    assert env.client_helo == "[192.0.2.9]"
    assert env.queue_id == "1A2B3C"


def test_client_port_logging():
    env = read_trace(mail(
        "Delivered-To: x@example.test",
        "Received: from helo.example (rdns.example [192.0.2.9]:40312)",
        "\tby mx.example.test (Postfix) with ESMTP id ABC123",
    ))
    assert (env.client_ip, env.client_helo, env.client_rdns) == ("192.0.2.9", "helo.example", "rdns.example")


def test_null_sender():
    env = read_trace(mail("Return-Path: <>", *TRACE[1:], *SENDER_HEADERS))
    assert env.sender == ""
    assert env.recipient == "anything@example.test"


def test_forged_lower_headers_are_ignored():
    forged = (
        "Delivered-To: victim@elsewhere.example",
        "X-Original-To: victim@elsewhere.example",
        "Return-Path: <forged@evil.example>",
        "Received: from forged.example (forged.example [10.6.6.6])",
        "\tby forged.example (Postfix) with ESMTP id FORGED",
    )
    env = read_trace(mail(*TRACE, *forged, *SENDER_HEADERS))
    assert env.recipient == "anything@example.test"
    assert env.original_recipient == "anything@example.test"
    assert env.sender == "Sender@Example.org"
    assert env.client_ip == "203.0.113.5"
    assert env.queue_id == "4ABCDEF123"


def test_delivery_headers_below_our_received_are_not_trusted():
    # Without Postfix's own X-Original-To (pipe without the O flag), the
    # sender's copy below our Received header must not be taken instead.
    env = read_trace(mail(
        "Delivered-To: anything@example.test",
        *TRACE[3:],
        "X-Original-To: victim@elsewhere.example",
        *SENDER_HEADERS,
    ))
    assert env.recipient == "anything@example.test"
    assert env.original_recipient is None


def test_pipe_order_of_prepended_headers():
    env = read_trace(mail(
        "Delivered-To: b@example.test",
        "X-Original-To: a@example.test",
        "Return-Path: <s@example.org>",
        *TRACE[3:],
    ))
    assert (env.sender, env.recipient, env.original_recipient) == ("s@example.org", "b@example.test", "a@example.test")


def test_mail_without_trace_headers():
    env = read_trace(mail(*SENDER_HEADERS))
    assert env == Envelope()
    assert all(value is None for value in env.to_dict().values())


def test_body_is_never_read():
    env = read_trace(mail("Subject: x", body="Delivered-To: evil@example.org\nReceived: from a (b [1.2.3.4])\n"))
    assert env == Envelope()


@pytest.mark.parametrize("raw", [b"", b"\x00\xff" * 1000, b"\n\n\n", b"Received:", b"Received: from", b"\r\n"])
def test_junk_gives_an_empty_envelope(raw):
    assert read_trace(raw) == Envelope()


def test_bogus_ip_literal_is_dropped():
    env = read_trace(mail("Received: from h (r [not-an-ip]) by mx (Postfix) with ESMTP id Q1"))
    assert env.client_ip is None
    assert env.client_helo == "h"
    assert env.queue_id == "Q1"


def test_pickup_received_has_no_client():
    env = read_trace(mail(
        "Return-Path: <root@mx.example.test>",
        "Delivered-To: x@example.test",
        "Received: by mx.example.test (Postfix, from userid 0)",
        "\tid 5C3D2E1F; Mon, 13 Jan 2025 10:00:00 +0000 (UTC)",
    ))
    assert env.client_ip is None and env.client_helo is None
    assert env.queue_id == "5C3D2E1F"


def test_utf8_recipient():
    env = read_trace(mail("Delivered-To: JÖRG@example.test", "Received: from a (b [192.0.2.1]) by c (Postfix) id Q"))
    assert env.recipient == "jörg@example.test"


# --------------------------------------------------------------------------
# header_block_end / split_header_block


@pytest.mark.parametrize(
    "raw, end",
    [
        (b"A: 1\nB: 2\n\nbody", 10),
        (b"A: 1\r\nB: 2\r\n\r\nbody", 12),
        (b"A: 1\n\r\n\nx", 5),  # the first empty line wins
        (b"\nbody", 0),
        (b"\r\nbody", 0),
        (b"A: 1\nB: 2", 9),  # no empty line: everything is headers
        (b"", 0),
    ],
)
def test_header_block_end(raw, end):
    assert header_block_end(raw) == end


def test_header_block_end_does_not_read_the_body():
    # The CRLF form is looked for only before the LF form's hit.
    raw = b"A: 1\n\n" + b"x" * 100 + b"\n\r\n"
    assert header_block_end(raw) == 5


def test_split_header_block_unfolds_and_keeps_order():
    raw = b"Subject: a\n long\n\tsubject\nX-Dup: 1\nX-Dup: 2\nObs-Space : v\n\nbody"
    fields, body_start = split_header_block(raw)
    assert fields == [
        ("Subject", b"a long\tsubject"),
        ("X-Dup", b"1"),
        ("X-Dup", b"2"),
        ("Obs-Space", b"v"),
    ]
    assert raw[body_start:] == b"body"


def test_split_header_block_without_separator_line():
    raw = b"Content-Type: text/plain\nthis is body text\nmore\n"
    fields, body_start = split_header_block(raw)
    assert fields == [("Content-Type", b"text/plain")]
    assert raw[body_start:] == b"this is body text\nmore\n"


def test_split_header_block_skips_mbox_from_line():
    raw = b"From sender@example.org Mon Jan 13 10:00:00 2025\nSubject: x\n\nbody"
    fields, body_start = split_header_block(raw)
    assert fields == [("Subject", b"x")]
    assert raw[body_start:] == b"body"


def test_split_header_block_range():
    raw = b"junk--\nContent-Type: text/plain\n\npart body\n--b--"
    start = raw.index(b"Content-Type")
    stop = raw.index(b"\n--b--")
    fields, body_start = split_header_block(raw, start, stop)
    assert fields == [("Content-Type", b"text/plain")]
    assert raw[body_start:stop] == b"part body"


def test_header_text_charsets():
    assert header_text(b"plain") == "plain"
    assert header_text("Jörg".encode()) == "Jörg"
    assert header_text("café".encode("cp1252")) == "café"
