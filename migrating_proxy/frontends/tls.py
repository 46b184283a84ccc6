"""TLS contexts for the listeners (our certificate) and for connections to the store."""

from __future__ import annotations

import re

from OpenSSL import SSL
from twisted.internet import ssl

from migrating_proxy.config import TLSConfig


def server_options(tls: TLSConfig) -> ssl.CertificateOptions | None:
    """Options for STARTTLS/STLS and the implicit-TLS listeners; None when TLS is not set up."""
    if not tls.enabled:
        return None
    assert tls.cert is not None
    pem = tls.cert.read_bytes()
    if tls.key is not None:
        pem += b"\n" + tls.key.read_bytes()
    certificate = ssl.PrivateCertificate.loadPEM(pem)
    chain = [ssl.Certificate.loadPEM(block) for block in _extra_chain(tls.cert.read_bytes())]
    return ssl.CertificateOptions(
        privateKey=certificate.privateKey.original,
        certificate=certificate.original,
        extraCertChain=[c.original for c in chain],
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
    )


def _extra_chain(pem: bytes) -> list[bytes]:
    """Intermediate certificates that follow the leaf in the cert file."""
    marker = b"-----BEGIN CERTIFICATE-----"
    blocks = [marker + part for part in pem.split(marker)[1:]]
    return blocks[1:]


def client_options(host: str, verify: bool = True,
                   ca_pem: str | None = None) -> ssl.IOpenSSLClientConnectionCreator:
    """TLS towards an upstream: verified against the system trust store (plus an old server's
    private CA, `domain add --source-ca`), or (--no-verify-tls) encrypted but unverified."""
    if not verify:
        return ssl.CertificateOptions()  # type: ignore[return-value]
    if ca_pem:
        return ssl.optionsForClientTLS(host, trustRoot=SystemAndPrivateCA(ca_pem))
    return ssl.optionsForClientTLS(host)


class SystemAndPrivateCA(type(ssl.platformTrust())):  # type: ignore[misc]
    """The system's CAs and the given ones, as the copy engine trusts them (cacerts.py);
    Twisted's own trust roots are either the system's (platformTrust, extended here) or only
    the given ones."""

    def __init__(self, ca_pem: str) -> None:
        blocks = re.findall(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", ca_pem,
                            flags=re.S)
        self.certificates = [ssl.Certificate.loadPEM(block).original for block in blocks]

    def _addCACertsToContext(self, context: SSL.Context) -> None:
        super()._addCACertsToContext(context)
        store = context.get_cert_store()
        assert store is not None
        for certificate in self.certificates:
            store.add_cert(certificate)
