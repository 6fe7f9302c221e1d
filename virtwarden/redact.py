"""Secrets out of anything that is printed or logged.

``mask`` takes a URL, a libpq keyword string or a whole message and replaces every
password it can recognise with ``***``:

- the password of a URL's user information, ``scheme://user:PASS@host`` and Redis's
  ``redis://:PASS@host``;
- the value of every parameter whose name says it is secret (``password``, ``passwd``,
  ``pwd``, ``sslpassword``, ``secret``, ``secret_access_key``, ``token``, ``api_key``,
  ``signature``, ``credential``, ...), in a query string (``?password=``,
  ``&password=``, ``;password=``) or as a libpq keyword (``host=db password=PASS``).

Nothing else changes: user names, hosts, ports, databases and paths stay readable, so a
message still says what it is about.
"""
from __future__ import annotations

import logging
import re

HIDDEN = "***"

# Parameter names that carry secrets (matched anywhere in the name, any case).
_SECRET_WORDS = ("pass", "pwd", "secret", "token", "signature", "credential", "apikey", "api_key", "api-key",
                 "auth_key", "authkey", "private_key")
_NAME = r"[A-Za-z][A-Za-z0-9_.\-]*"
_PARAM = re.compile(rf"(?P<lead>^|[?&;\s,(\"'])(?P<name>{_NAME})=(?P<value>\"[^\"]*\"|'[^']*'|[^&;#\s,)\"']*)")
_URL = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<rest>[^\s\"'<>]*)")


def mask(text: str | None) -> str:
    """``text`` with every password, secret and token it holds replaced by ``***``."""
    if not text:
        return text or ""
    text = _URL.sub(lambda m: m["scheme"] + _mask_userinfo(m["rest"]), text)
    return _PARAM.sub(_mask_param, text)


def has_password(url: str | None) -> bool:
    """True when ``url`` carries a secret that ``mask`` would hide."""
    return bool(url) and mask(url) != url


def _is_secret(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in _SECRET_WORDS)


def _mask_param(m: re.Match[str]) -> str:
    if not _is_secret(m["name"]) or not m["value"] or m["value"] == HIDDEN:
        return m.group(0)
    return f"{m['lead']}{m['name']}={HIDDEN}"


def _mask_userinfo(rest: str) -> str:
    """The part after ``scheme://`` with the password of its user information hidden.

    The authority ends at the first ``/``, ``?`` or ``#``; a password should have those
    percent-encoded, but one that does not (``redis://:pa/ss@host``) is hidden too: an
    ``@`` before the query, preceded by ``user:`` where what follows the colon is not
    a port number, ends the user information."""
    head = re.split(r"[?#]", rest, maxsplit=1)[0]
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    if "@" in authority:
        at = authority.rfind("@")
    elif "@" in head:
        at = head.find("@")
        colon = head.find(":")
        if colon < 0 or colon > at or "/" in head[:colon]:
            return rest
        if re.fullmatch(r"\d+", re.split(r"/", head[colon + 1:], maxsplit=1)[0]):
            return rest  # host:port/path@...: an @ in the path, not a password
    else:
        return rest
    userinfo = rest[:at]
    if ":" not in userinfo:
        return rest
    user = userinfo.split(":", 1)[0]
    return f"{user}:{HIDDEN}{rest[at:]}"


class MaskingFilter(logging.Filter):
    """Masks every record that passes a handler, whoever logged it: the message and each
    argument. Arguments stay arguments (formatters such as uvicorn's access log unpack
    them); one whose text holds a password is replaced by its masked text."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = mask(record.msg)
        elif record.msg is not None and mask(str(record.msg)) != str(record.msg):
            record.msg = mask(str(record.msg))
        if isinstance(record.args, tuple):
            record.args = tuple(_masked_arg(a) for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: _masked_arg(v) for k, v in record.args.items()}
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = mask(record.exc_text)
        return True


def _masked_arg(value: object) -> object:
    if isinstance(value, (int, float)) or value is None:
        return value
    text = str(value)
    masked = mask(text)
    return value if masked == text else masked


def install_log_masking(logger: logging.Logger | None = None) -> None:
    """Add a ``MaskingFilter`` to every handler of ``logger`` (default: the root logger)."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, MaskingFilter) for f in handler.filters):
            handler.addFilter(MaskingFilter())
