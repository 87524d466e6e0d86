"""Typed keys for what the application holds.

A leaf module: handlers, middlewares and the app factory all import it, and it imports nothing
from ``exporter.web``, so no area module ever needs the factory's module.
"""

from __future__ import annotations

from aiohttp import web

from exporter.logs import Throttle
from exporter.service import Service

SERVICE: web.AppKey[Service] = web.AppKey("service", Service)
#: Warnings about requests refused for a missing or wrong token, by method and route.
REJECTIONS: web.AppKey[Throttle] = web.AppKey("rejections", Throttle)
