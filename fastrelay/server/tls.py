"""The one TLS policy point: `server_ssl_context`.

* TLS 1.2 minimum; TLS 1.3 preferred by OpenSSL's defaults.
* No renegotiation (``OP_NO_RENEGOTIATION``): a renegotiating SSL_write can
  keep a reference to our buffer after ``write()`` returns (docs/runtime-facts.md §1),
  which the splice's buffer reuse must never meet.
* No compression (CRIME), ALPN ``http/1.1`` only: we speak nothing else.

Loading errors are `CertificateError`s that say which file and what is wrong
in words; OpenSSL's own ``[SSL] PEM lib`` says neither.
"""

from __future__ import annotations

import re
import ssl

from ..core.logsafe import safe

_CERT_BLOCK = re.compile(rb"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", re.DOTALL)
_KEY_BLOCK = re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----")
# PKCS#8 encrypted keys, and the legacy OpenSSL header of encrypted PKCS#1 keys.
_ENCRYPTED = re.compile(rb"-----BEGIN ENCRYPTED PRIVATE KEY-----|Proc-Type: *4, *ENCRYPTED")


class CertificateError(OSError):
    """The certificate or key file cannot serve TLS.

    An `OSError` (as the errors of ``load_cert_chain`` are) so callers that
    catch those keep working. ``role`` is ``"certfile"`` or ``"keyfile"``,
    ``path`` the file, ``reason`` what is wrong, in words.
    """

    def __init__(self, role: str, path: str, reason: str) -> None:
        # Paths come from the command line or config files: escaped so the
        # message stays one line whatever the name holds.
        super().__init__(f"cannot load {role} {safe(path, 1024)}: {reason}")
        self.role = role
        self.path = path
        self.reason = reason


def _read(role: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise CertificateError(role, path, exc.strerror or str(exc)) from None


def _no_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal and block a
    # service start; an encrypted key is reported instead.
    raise CertificateError("keyfile", "", "encrypted")


def _check_pem(certfile: str, keyfile: str | None) -> None:
    """Check each file on its own, so an error can name the file at fault."""
    cert_pem = _read("certfile", certfile)
    blocks = _CERT_BLOCK.findall(cert_pem)
    if not blocks:
        raise CertificateError("certfile", certfile, "not a PEM certificate")
    try:
        # A throwaway trust store parses the certificates and nothing else.
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(
            cadata=b"\n".join(blocks).decode("ascii")
        )
    except (ssl.SSLError, ValueError):
        raise CertificateError("certfile", certfile, "a PEM certificate block is corrupt") from None
    key_role, key_path = ("keyfile", keyfile) if keyfile is not None else ("certfile", certfile)
    key_pem = cert_pem if keyfile is None else _read("keyfile", keyfile)
    if not _KEY_BLOCK.search(key_pem):
        what = "not a PEM private key" if keyfile is not None else "no keyfile and no key in it"
        raise CertificateError(key_role, key_path, what)
    if _ENCRYPTED.search(key_pem):
        raise CertificateError(
            key_role, key_path, "the private key is encrypted; fastrelay needs an unencrypted key"
        )


def server_ssl_context(certfile: str, keyfile: str | None = None) -> ssl.SSLContext:
    _check_pem(certfile, keyfile)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.set_alpn_protocols(["http/1.1"])
    key_role, key_path = ("keyfile", keyfile) if keyfile is not None else ("certfile", certfile)
    try:
        ctx.load_cert_chain(certfile, keyfile, password=_no_password)
    except CertificateError:
        raise CertificateError(
            key_role, key_path, "the private key is encrypted; fastrelay needs an unencrypted key"
        ) from None
    except ssl.SSLError as exc:
        # The certificate parsed above, so what is left is the key: either
        # it is not the certificate's, or it does not decode.
        if exc.reason == "KEY_VALUES_MISMATCH":
            reason = "the key does not match the certificate"
        else:
            reason = "a PEM private key block is corrupt"
        raise CertificateError(key_role, key_path, reason) from None
    except OSError as exc:  # the file changed or vanished since _check_pem
        raise CertificateError(key_role, key_path, exc.strerror or str(exc)) from None
    return ctx
