"""Start and stop the grpc.aio server in the serving event loop (docs/architecture.md, decision 1).

Besides graft.v1 it serves the standard health checking service (SERVING
once started, which happens after the backbones are loaded, and while the
registry database answers; NOT_SERVING otherwise and while draining) and server
reflection, so load balancers and grpcurl work as usual. The port speaks TLS only
when GRAFT_GRPC_TLS_CERT_FILE and GRAFT_GRPC_TLS_KEY_FILE are set (clients use
grpcs://), plaintext otherwise. On a replica that only trains (``GRAFT_ROLE=train``)
the overall service ("") and PredictionService are always NOT_SERVING, so a load
balancer never sends it predictions; its other services (jobs, datasets, heads, backbones) report as usual.
"""

import asyncio
import contextlib
import re
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service.auth import CLIENT
from service.config import Settings
from service.grpc.gen.graft.v1 import service_pb2
from service.grpc.gen.graft.v1 import service_pb2_grpc as rpc
from service.grpc.servicer import SERVICES
from service.runtime import Runtime

_SERVICE_NAMES = [service.full_name for service in service_pb2.DESCRIPTOR.services_by_name.values()]
_PREDICTIONS = {"", service_pb2.DESCRIPTOR.services_by_name["PredictionService"].full_name}
HEALTH_POLL_S = 1.0


_PEER_HOST = re.compile(r"^(?:ipv4|ipv6):(?P<host>\[[^\]]*\]|[^:]*)")


class ClientAddress(grpc.aio.ServerInterceptor):
    """Each call runs with ``service.auth.CLIENT`` set to its peer's address: authentication's rate limits key on it.

    The handler's behaviour is wrapped (not the servicer), so every method of every service gets it.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            if (behaviour := getattr(handler, kind)) is not None:
                return handler._replace(**{kind: _with_peer(behaviour, streaming=kind.endswith("stream"))})
        return handler


def _with_peer(behaviour: Callable[..., Any], *, streaming: bool) -> Callable[..., Any]:
    def set_peer(context: grpc.aio.ServicerContext) -> None:
        match = _PEER_HOST.match(context.peer() or "")
        CLIENT.set(match["host"] if match else None)

    if streaming:

        async def streaming_behaviour(request: Any, context: grpc.aio.ServicerContext) -> Any:
            set_peer(context)
            result = behaviour(request, context)
            if hasattr(result, "__aiter__"):
                async for item in result:
                    yield item
            else:  # a method that writes with context.write and returns None
                await result

        return streaming_behaviour

    async def unary_behaviour(request: Any, context: grpc.aio.ServicerContext) -> Any:
        set_peer(context)
        return await behaviour(request, context)

    return unary_behaviour


def health_of(runtime: Runtime) -> dict[str, bool]:
    """Whether each health service name is SERVING: "" and PredictionService say "send me predictions"
    (readiness), the others "send me API calls"."""
    return {name: runtime.ready if name in _PREDICTIONS else runtime.accepting for name in ["", *_SERVICE_NAMES]}


class GrpcServer:
    def __init__(self, server: grpc.aio.Server, health_servicer: health.aio.HealthServicer, port: int) -> None:
        self.server = server
        self.health = health_servicer
        self.port = port
        self._follower: asyncio.Task[None] | None = None

    async def set_serving(self, serving: bool | dict[str, bool]) -> None:
        """Every name SERVING or NOT_SERVING, or each as ``serving`` (a name -> serving map) says."""
        statuses = serving if isinstance(serving, dict) else dict.fromkeys(["", *_SERVICE_NAMES], serving)
        for name, up in statuses.items():
            status = health_pb2.HealthCheckResponse.SERVING if up else health_pb2.HealthCheckResponse.NOT_SERVING
            await self.health.set(name, status)

    def follow(self, runtime: Runtime) -> None:
        """Keep the health status in step with the runtime (registry probe, draining, role)."""

        async def follow_forever() -> None:
            statuses: dict[str, bool] = {}
            while True:
                if (now := health_of(runtime)) != statuses:
                    statuses = now
                    await self.set_serving(statuses)
                await asyncio.sleep(HEALTH_POLL_S)

        self._follower = asyncio.get_running_loop().create_task(follow_forever(), name="grpc-health")

    async def stop(self, grace: float) -> None:
        """Refuse new calls, let in-flight ones finish for up to ``grace`` seconds."""
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follower
        await self.set_serving(False)
        await self.server.stop(grace)


def default_host(runtime: Runtime) -> str:
    """Open mode (no keys) is for local development: only this machine may call. With keys: every interface."""
    return "127.0.0.1" if runtime.settings.auth == "open" else "0.0.0.0"


def tls_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """The port's TLS certificate and key (GRAFT_GRPC_TLS_CERT_FILE / _KEY_FILE), read once at start; None:
    plaintext (TLS ends at a load balancer, or the network is private). A missing or unreadable file stops the
    start with a message naming the setting, never a plaintext port instead."""
    if settings.grpc_tls_cert_file is None or settings.grpc_tls_key_file is None:
        return None
    pems = []
    for setting, path in (
        ("GRAFT_GRPC_TLS_KEY_FILE", settings.grpc_tls_key_file),
        ("GRAFT_GRPC_TLS_CERT_FILE", settings.grpc_tls_cert_file),
    ):
        try:
            pems.append(path.read_bytes())
        except OSError as exc:
            raise RuntimeError(f"{setting}={path}: cannot read it ({exc.strerror or exc})") from None
    return grpc.ssl_server_credentials([(pems[0], pems[1])])


async def start_grpc_server(runtime: Runtime, port: int, host: str | None = None) -> GrpcServer:
    limit = runtime.settings.grpc_max_message_bytes
    server = grpc.aio.server(
        interceptors=[ClientAddress()],
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
        ],
    )
    for service in SERVICES:
        registrar = getattr(rpc, f"add_{service.__name__}Servicer_to_server")
        registrar(service(runtime), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*_SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    address = f"{host or default_host(runtime)}:{port}"
    credentials = tls_credentials(runtime.settings)
    bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    await server.start()
    handle = GrpcServer(server, health_servicer, bound)
    await handle.set_serving(health_of(runtime))
    handle.follow(runtime)
    return handle
