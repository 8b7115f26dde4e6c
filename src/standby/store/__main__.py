"""Maintenance of the store's schema, for developers and operators (no alembic.ini needed).

    python -m standby.store upgrade URL          # migrate a database to the newest revision
    python -m standby.store current URL          # the revision a database is at
    python -m standby.store check URL            # fail if the models differ from the migrations
    python -m standby.store revision -m "add X"  # write a new migration from the model changes

`revision` autogenerates against a scratch SQLite database migrated to head; read the
result before committing it (Alembic cannot see renames, and CHECK constraints are not
compared).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from alembic import command

from standby.store.db import alembic_config, create_store_engine, current_revision, head_revision, upgrade


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m standby.store", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("upgrade", "current", "check"):
        sub.add_parser(name).add_argument("url")
    rev = sub.add_parser("revision")
    rev.add_argument("-m", "--message", required=True)
    args = ap.parse_args(argv)

    if args.cmd == "revision":
        with tempfile.TemporaryDirectory() as d:
            engine = create_store_engine(f"sqlite:///{Path(d) / 'scratch.db'}")
            try:
                upgrade(engine)
                with engine.begin() as conn:
                    number = int(head_revision().split("_")[0]) + 1
                    command.revision(
                        alembic_config(conn), message=args.message, autogenerate=True, rev_id=f"{number:04d}"
                    )
            finally:
                engine.dispose()
        return 0

    engine = create_store_engine(args.url)
    try:
        if args.cmd == "upgrade":
            upgrade(engine)
            print(current_revision(engine))
        elif args.cmd == "current":
            print(current_revision(engine) or "(empty)")
        else:
            with engine.connect() as conn:
                command.check(alembic_config(conn))
    finally:
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
