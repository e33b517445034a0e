"""A client host: many simulated clients in one process, client k at
http://HOST:PORT/clients/<k>, data from a named scenario (see fedavg.scenarios).

Run: cd client_host && poetry install && poetry run python client_host_app.py --scenario iid --clients 50
"""
import logging
import sys

from fedavg.client_host import create_host_app
from fedavg.scenarios import SCENARIOS, make_clients
from fedavg.service import cli, configure_logging, serve, shared_token

if __name__ == "__main__":
    parser = cli("Raw FedAvg client host: K simulated clients in one process", 6000)
    parser.add_argument("--scenario", choices=SCENARIOS, default="iid")
    parser.add_argument("--clients", type=int, default=10, help="K, the number of clients (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="the scenario's seed (default 0)")
    parser.add_argument("--samples", type=int, default=20, help="n_k per client, or its mean (default 20)")
    parser.add_argument("--csv", help="for --scenario csv: the CSV to split among the clients")
    args = parser.parse_args()
    configure_logging()
    # One line per /train of a thousand clients would bury everything else.
    logging.getLogger("fedavg.client").setLevel(logging.WARNING)
    try:
        clients = make_clients(args.scenario, args.clients, args.seed, args.samples, args.csv)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    app = create_host_app(clients, shared_token(), f"{args.scenario}, K={len(clients)}, seed={args.seed}")
    base = f"http://{args.host}:{args.port}"
    print(f"client host: {len(clients)} clients ({args.scenario}, seed {args.seed}, "
          f"{sum(len(c.y) for c in clients)} samples) at {base}/clients/1 … {base}/clients/{len(clients)}",
          flush=True)
    serve(app, args.host, args.port)
