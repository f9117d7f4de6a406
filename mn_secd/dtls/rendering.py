"""How a DTLS server context renders a request: upstream's pipes, or a short way for plain requests.

aiocoap hands every incoming request to the site through two pipes (the token manager's, and one
that turns exceptions into answers), a closure or two on each, and a task named after the request's
``repr``. That suits an observation, which answers many times; a request answered exactly once
pays for all of it too, and on the key service it was a tenth of the CPU time of a key request.

:class:`ServerTokenManager` takes a *plain* request the short way: no Observe and no Block option
(so exactly one answer), no request in flight on its token, and a site that names the resource for
it (:class:`PlainSite`). The resource renders it in one task; the answer, or the one upstream's
``error_to_message`` makes of an exception, goes to the message manager exactly as upstream's token
manager hands it over. Any other request, and any request on a site that does not take part, goes
upstream's way, through :class:`ServerContext` (upstream's ``render_to_pipe``, without formatting
the request). The upstream code this re-states is pinned by hash in :mod:`.upstream`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import Any, Protocol

import aiocoap
from aiocoap import error as coap_error
from aiocoap.numbers.codes import Code
from aiocoap.numbers.optionnumbers import OptionNumber
from aiocoap.pipe import Pipe, error_to_message, run_driving_pipe
from aiocoap.tokenmanager import TokenManager

#: The name of every task that renders a request (upstream: "Rendering for <the request's repr>").
TASK_NAME = "CoAP request over DTLS"


class Renderer(Protocol):
    """A resource that answers a request with one message (aiocoap's ``Resource.render``)."""

    def render(self, request: aiocoap.Message) -> Awaitable[aiocoap.Message]: ...


class PlainSite(Protocol):
    """A site that lets the short way render some of its requests."""

    def plain_resource(self, request: aiocoap.Message) -> Renderer | None:
        """The resource that answers ``request`` (a plain one) with exactly one message, or None to
        leave it to aiocoap's way (an unknown path, a resource that answers more than once...)."""


class ServerContext(aiocoap.Context):  # type: ignore[misc]
    """aiocoap's Context as a DTLS server, rendering each request without formatting it.

    Upstream names the task that renders a request after the request's ``repr`` (so a request
    costs one message formatted to a string, logged or not); this is upstream's ``render_to_pipe``
    with a fixed name. The request is in the task's frames for anyone debugging.
    """

    def render_to_pipe(self, pipe: Pipe) -> None:
        run_driving_pipe(error_to_message(pipe, self.log), self._render_to_pipe(pipe), name=TASK_NAME)


class ServerTokenManager(TokenManager):  # type: ignore[misc]
    """aiocoap's TokenManager, with the short way for plain requests (see the module)."""

    def process_request(self, request: aiocoap.Message) -> None:
        key = (request.token, request.remote)
        resource = self._plain_resource(request) if key not in self.incoming_requests else None
        if resource is None:
            super().process_request(request)
            return
        task = self.loop.create_task(self._render(resource, request, key), name=TASK_NAME)
        # As upstream's entry: a request overriding this one on the same token, or the session's
        # end, stops it (the task is cancelled and answers nothing, as upstream's would).
        self.incoming_requests[key] = (None, task.cancel)

    def _plain_resource(self, request: aiocoap.Message) -> Renderer | None:
        find = getattr(self.context.serversite, "plain_resource", None)
        option = request.opt.get_option
        if find is None or option(OptionNumber.OBSERVE) or option(OptionNumber.BLOCK1) or option(OptionNumber.BLOCK2):
            return None  # answered more than once, or in blocks: aiocoap's way
        resource: Renderer | None = find(request)
        return resource

    async def _render(self, resource: Renderer, request: aiocoap.Message, key: tuple[Any, Any]) -> None:
        entry = self.incoming_requests[key]
        try:
            try:
                response = await resource.render(request)
            except Exception as exc:
                response = answer_to_exception(exc, self.log)
            # What upstream's token manager does with a response before handing it over.
            response.token = request.token
            response.remote = request.remote.as_response_address()
            response.request = request
            self.token_interface.send_message(response, _nothing)
        finally:
            if self.incoming_requests is not None and self.incoming_requests.get(key) is entry:
                del self.incoming_requests[key]


def answer_to_exception(exc: Exception, log: logging.Logger) -> aiocoap.Message:
    """The answer upstream's ``error_to_message`` makes of an exception a resource raised, logged as
    upstream logs it: a renderable error (4.04, 4.05...) its own message, anything else 5.00."""
    if isinstance(exc, coap_error.RenderableError):
        log.info("Render request raised a renderable error (%s), responding accordingly.", repr(exc))
        try:
            message = exc.to_message()
            if message is None:
                raise ValueError(f"Exception to_message failed to produce a message on {exc!r}")
        except Exception as failure:
            log.error("Rendering the renderable exception failed: %r", failure, exc_info=failure)
            message = aiocoap.Message(code=Code.INTERNAL_SERVER_ERROR)
        return message
    log.error("An exception occurred while rendering a resource: %r", exc, exc_info=exc)
    return aiocoap.Message(code=Code.INTERNAL_SERVER_ERROR)


def _nothing() -> None:
    """The message-error monitor of a plain request: once it is answered there is nothing to stop."""
