"""The endpoint strings of xaind: declarations only, the work lives in the package."""

from typing import Any

from twisted.internet.interfaces import IStreamServerEndpointStringParser
from twisted.plugin import IPlugin
from zope.interface import implementer


@implementer(IPlugin, IStreamServerEndpointStringParser)
class XaindTLSServerParser:
    """`xaind-tls:` (xaind/tls_server.py): `ssl:` with an optional client CA."""

    prefix = "xaind-tls"

    def parseStreamServer(self, reactor: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N802 - Twisted's name
        from xaind.tls_server import tls_server_endpoint

        return tls_server_endpoint(reactor, *args, **kwargs)


xaind_tls = XaindTLSServerParser()


@implementer(IPlugin, IStreamServerEndpointStringParser)
class XaindTCPServerParser:
    """`xaind-tcp:` (xaind/reuse_port.py): `tcp:` that may share its port (`reusePort=yes`)."""

    prefix = "xaind-tcp"

    def parseStreamServer(self, reactor: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N802 - Twisted's name
        from xaind.reuse_port import reuse_port_server_endpoint

        return reuse_port_server_endpoint(reactor, *args, **kwargs)


xaind_tcp = XaindTCPServerParser()
