"""The gRPC door: graft.v1 services on a grpc.aio server inside the BentoML worker."""
