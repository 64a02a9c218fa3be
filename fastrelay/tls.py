"""The one TLS policy point: `server_ssl_context`.

* TLS 1.2 minimum; TLS 1.3 preferred by OpenSSL's defaults.
* No renegotiation (``OP_NO_RENEGOTIATION``): a renegotiating SSL_write can
  keep a reference to our buffer after ``write()`` returns (runtime-facts §1),
  which the splice's buffer reuse must never meet.
* No compression (CRIME), ALPN ``http/1.1`` only: we speak nothing else.
"""

from __future__ import annotations

import ssl


def server_ssl_context(certfile: str, keyfile: str | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.set_alpn_protocols(["http/1.1"])
    ctx.load_cert_chain(certfile, keyfile)
    return ctx
