"""TLS contexts for the listeners (our certificate) and for connections to the store."""

from __future__ import annotations

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


def client_options(host: str, verify: bool = True) -> ssl.IOpenSSLClientConnectionCreator:
    """TLS towards an upstream: verified against the system trust store, or (an old server
    whose domain was added with --no-verify-tls) encrypted but unverified."""
    if verify:
        return ssl.optionsForClientTLS(host)
    return ssl.CertificateOptions()  # type: ignore[return-value]
