"""Start and stop the grpc.aio server in the serving event loop (DESIGN.md decision 1).

Besides graft.v1 it serves the standard health checking service (SERVING
once started, which happens after the backbones are loaded; NOT_SERVING while
draining) and server reflection, so load balancers and grpcurl work as usual.
"""

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service.grpc.gen.graft.v1 import service_pb2
from service.grpc.gen.graft.v1 import service_pb2_grpc as rpc
from service.grpc.servicer import SERVICES
from service.runtime import Runtime

_SERVICE_NAMES = [service.full_name for service in service_pb2.DESCRIPTOR.services_by_name.values()]


class GrpcServer:
    def __init__(self, server: grpc.aio.Server, health_servicer: health.aio.HealthServicer, port: int) -> None:
        self.server = server
        self.health = health_servicer
        self.port = port

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *_SERVICE_NAMES]:
            await self.health.set(name, status)

    async def stop(self, grace: float) -> None:
        """Refuse new calls, let in-flight ones finish for up to ``grace`` seconds."""
        await self.set_serving(False)
        await self.server.stop(grace)


async def start_grpc_server(runtime: Runtime, port: int, host: str = "0.0.0.0") -> GrpcServer:
    limit = runtime.settings.grpc_max_message_bytes
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
    ])  # fmt: skip
    for service in SERVICES:
        registrar = getattr(rpc, f"add_{service.__name__}Servicer_to_server")
        registrar(service(runtime), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*_SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    handle = GrpcServer(server, health_servicer, bound)
    await handle.set_serving(True)
    return handle
