"""Signed webhooks (issue 26): tenants' endpoints, the outbox of deliveries, the address policy and the worker.

Emitting an event (``outbox.emit``) inserts one delivery row per matching endpoint in the caller's transaction;
each replica's ``DeliveryWorker`` claims due rows under a lease and POSTs them, signed (``signing.py``), only to
addresses the operator allows (``addresses.py``).
"""
