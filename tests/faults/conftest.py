"""Fault tests reuse the gateway fixtures (a real server on a free port, the echo worker)."""

from tests.gateway.conftest import echo, gateway, gateway_settings, start_gateway

__all__ = ["echo", "gateway", "gateway_settings", "start_gateway"]
