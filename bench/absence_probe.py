"""Inside a lab node: time the double-absence gate for HOST's adverts (wipe's confirmation).

Usage: python3 -m bench.absence_probe STYPE HOST ADDR -> prints {"ms": ..., "code": ...}
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from agent.wipe import confirm_absent


async def main() -> None:
    started = time.monotonic()
    code, reason = await confirm_absent(sys.argv[1], sys.argv[2], sys.argv[3])
    print(json.dumps({"ms": (time.monotonic() - started) * 1000, "code": code, "reason": reason}))


if __name__ == "__main__":
    asyncio.run(main())
