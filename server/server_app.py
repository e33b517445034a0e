"""The server: orchestrates FedAvg rounds over the clients, port 5000.

Run: cd server && poetry install && poetry run python server_app.py
Then: curl -X POST http://127.0.0.1:5000/start
"""
import os
import sys

from fedavg.service import cli, configure_logging, serve
from fedavg_server import client_urls, create_app

if __name__ == "__main__":
    parser = cli("Raw FedAvg server", 5000)
    parser.add_argument("--clients", default=os.environ.get("FEDAVG_CLIENTS"),
                        help="comma-separated client URLs (default: env FEDAVG_CLIENTS, "
                             "else http://127.0.0.1:5001,http://127.0.0.1:5002)")
    parser.add_argument("--max-parallel", type=int, default=None,
                        help="at most this many client calls at once (default: sized for this machine)")
    parser.add_argument("--db", default=os.environ.get("FEDAVG_DB"),
                        help="SQLite file of the run history (default: env FEDAVG_DB, else instance/fedavg.db)")
    args = parser.parse_args()
    configure_logging()
    try:
        clients = client_urls(args.clients)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    config = {"CLIENTS": clients}
    if args.db:
        config["DATABASE"] = args.db
    if args.max_parallel:
        config["MAX_PARALLEL"] = args.max_parallel
    app = create_app(config)
    print(f"server: {len(clients)} client(s): {', '.join(clients)}; run history in {app.config['DATABASE']}; "
          f"serving on http://{args.host}:{args.port}", flush=True)
    print(f"server: start a run with  curl -X POST http://{args.host}:{args.port}/start", flush=True)
    try:
        serve(app, args.host, args.port)
    finally:
        # Ctrl-C or SIGTERM: a running run finishes its round and reads
        # "interrupted" (resumable), instead of dying half-way.
        app.extensions["fedavg"].shutdown()
