"""Command line for operators: tenants and API keys, straight in the registry database.

    python -m service.admin create-tenant acme
    python -m service.admin create-key acme      # prints the key once
    python -m service.admin revoke-key 1a2b3c4d5e6f
    python -m service.admin list-tenants

It reads the same settings as the service (``GRAFT_DATA_DIR``,
``GRAFT_REGISTRY_URL``), so run it where the service's environment is set.
Exit codes: 0 done, 1 refused (the message says why), 2 bad usage.
"""

import argparse
import sys

from service.auth import Tenants
from service.config import Settings
from service.errors import GraftError
from service.store.db import Database


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = Settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    db = Database(settings.resolved_registry_url, settings.blob_dir)
    tenants = Tenants(db, settings)
    try:
        if args.command == "create-tenant":
            tenant = tenants.create_tenant(args.name)
            print(f"created tenant {tenant.name}")
        elif args.command == "create-key":
            key = tenants.create_key(args.tenant)
            note = f"API key {key.key_id} for tenant {key.tenant}; store it now, it is not shown again:"
            print(note, file=sys.stderr)
            print(key.secret)
        elif args.command == "revoke-key":
            tenants.revoke_key(args.key_id)
            print(f"revoked API key {args.key_id}")
        else:
            for tenant in tenants.list_tenants():
                print(f"{tenant.name}\t{tenant.created_at.isoformat()}")
    except GraftError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    finally:
        db.close()
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m service.admin", description="Manage graft tenants and API keys.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("create-tenant", help="add a tenant").add_argument("name")
    commands.add_parser("create-key", help="issue an API key for a tenant and print it once").add_argument("tenant")
    commands.add_parser("revoke-key", help="stop an API key from working").add_argument("key_id")
    commands.add_parser("list-tenants", help="print every tenant and when it was created")
    return parser


if __name__ == "__main__":
    sys.exit(main())
