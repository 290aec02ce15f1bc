"""Serving batches one at a time against side by side, on two real servers up at once, measured in alternation.

On a CPU graft runs one serving batch per torch thread at once, each
single-threaded (``GRAFT_TRUNK_WORKERS`` unset); ``GRAFT_TRUNK_WORKERS=1`` runs
one batch at a time as wide as torch's threads, as graft did before. Absolute
images/s drift by a third on this shared machine within minutes, so both
servers stay up and every level is measured on each in turn, in alternating
order, over several rounds; the figures are medians over rounds. 100 linear
heads, JSON predictions with one 250x250 JPEG each, the aiohttp client of
http_load.py.

    python benchmarks/trunk_workers.py       # prints one JSON object last
"""

import argparse
import asyncio
import base64
import json
import statistics
import sys
import tempfile
from pathlib import Path

from engine_setup import create_linear_heads
from http_load import UNLIMITED_QUOTAS, http_level

from harness.sample_data import textile_files
from harness.servers import start_server
from service.config import Settings
from service.core import Core

TENANT = "default"  # the tenant of GRAFT_AUTH=open
LEVELS = (1, 32, 128)
ARMS = {"one_at_a_time": {"GRAFT_TRUNK_WORKERS": "1"}, "side_by_side": {}}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()

    data_dir = Path(tempfile.mkdtemp(prefix="graft-trunk-workers-"))
    core = Core.open(Settings(data_dir=data_dir, auth="open"))
    heads = create_linear_heads(core, 100, tenant=TENANT)
    del core
    bodies = [
        json.dumps({"images": [base64.b64encode(data).decode()], "heads": ["__HEAD__"], "top_k": 5}).encode()
        for _, data, _ in textile_files(per_class=10)
    ]
    servers = {arm: start_server(data_dir, GRAFT_AUTH="open", **env, **UNLIMITED_QUOTAS) for arm, env in ARMS.items()}
    ips: dict[str, dict[int, list[float]]] = {arm: {level: [] for level in LEVELS} for arm in ARMS}
    try:
        for server in servers.values():
            await http_level(server.http_url, bodies, heads, 8, 3)  # warm-up: loads the heads
        for round_ in range(args.rounds):
            for level in LEVELS:
                order = list(servers) if round_ % 2 == 0 else list(servers)[::-1]
                for arm in order:
                    figures = await http_level(servers[arm].http_url, bodies, heads, level, args.seconds)
                    ips[arm][level].append(figures["ips"])
            print(
                f"round {round_ + 1}:",
                {arm: {c: v[-1] for c, v in by.items()} for arm, by in ips.items()},
                file=sys.stderr,
            )
    finally:
        for server in servers.values():
            server.stop()

    result: dict = {"seconds_per_level": args.seconds, "rounds": args.rounds, "heads": len(heads)}
    for arm, by_level in ips.items():
        for level, values in by_level.items():
            result[f"{arm}_ips_c{level}"] = round(statistics.median(values), 1)
    for level in LEVELS:
        pairs = zip(ips["side_by_side"][level], ips["one_at_a_time"][level], strict=True)
        result[f"side_by_side_over_one_at_a_time_c{level}"] = round(statistics.median(a / b for a, b in pairs), 3)
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
