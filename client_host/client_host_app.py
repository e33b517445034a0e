"""A client host: many simulated clients in one process, client k at
http://HOST:PORT/clients/<k>, data from a named scenario (see fedavg.scenarios).

Run: cd client_host && poetry install && poetry run python client_host_app.py --scenario iid --clients 50
"""
import logging
import sys
from pathlib import Path

try:
    from fedavg import tls_files
    from fedavg.data import TARGET, add_target
    from fedavg.dropout import Dropout
    from fedavg.http.host_app import create_host_app
    from fedavg.http.service import (
        add_server_name,
        base_url,
        cli,
        configure_logging,
        serve,
        shared_token,
        tls_from_args,
    )
    from fedavg.population import POPULATION_SCENARIOS, Population, check_shard, parse_shard
    from fedavg.scenarios import ATTACKERS, ATTACKS, SCENARIOS, about, make_clients
except ModuleNotFoundError as e:  # a python without the app's Poetry environment: say how to run it
    raise SystemExit(f"error: no module {e.name}; run: {__doc__.split('Run: ')[1].splitlines()[0]}") from None

if __name__ == "__main__":
    parser = cli("Raw FedAvg client host: K simulated clients in one process", 6000)
    parser.add_argument("--scenario", choices=SCENARIOS, default="iid")
    parser.add_argument("--clients", type=int, help="K, the number of clients (default 10)")
    parser.add_argument("--population", type=int, metavar="K",
                        help="K clients held as arrays, drawn at once (fedavg/population.py: its own draw, not "
                             "--clients' numbers), each client's endpoints built when first called: for a "
                             f"large K; scenarios {', '.join(POPULATION_SCENARIOS)}")
    parser.add_argument("--shard", metavar="I/N",
                        help="with --population: hold only shard I of N of the population that --population K "
                             "--seed S describes (its clients, their global numbers and names and data, the same "
                             "whatever N); start N hosts, and the server with --clients-from each of them")
    parser.add_argument("--seed", type=int, default=0, help="the scenario's seed (default 0)")
    parser.add_argument("--samples", type=int, default=20, help="n_k per client, or its mean (default 20)")
    parser.add_argument("--csv", type=Path,
                        help="for --scenario csv: the CSV to split among the clients (a relative path is "
                             "relative to the directory this runs in: client_host/ under poetry run)")
    add_target(parser)
    parser.add_argument("--attackers", type=int, metavar="F",
                        help=f"for --scenario byzantine: how many clients attack, the first F (default {ATTACKERS})")
    parser.add_argument("--attack", choices=ATTACKS,
                        help="for --scenario byzantine: what they send (default huge): "
                             + "; ".join(f"{name}: {what}" for name, what in ATTACKS.items()))
    parser.add_argument("--dropout", type=float, default=0.0, metavar="P",
                        help="each client drops out of each round with probability P, drawn from (--seed, the "
                             "round, the client): no result on either path (default 0)")
    parser.add_argument("--stragglers", type=float, default=0.0, metavar="P",
                        help="each client straggles in each round with probability P: it takes --straggle-s "
                             "seconds more (default 0)")
    parser.add_argument("--straggle-s", type=float, default=0.0, metavar="S",
                        help="how much longer a straggler takes: /train really waits, /batch/train reports it "
                             "timed out when S reaches the server's deadline (default 0)")
    add_server_name(parser)
    args = parser.parse_args()
    if args.scenario != "byzantine" and (args.attackers is not None or args.attack is not None):
        parser.error(f"--attackers and --attack are for --scenario byzantine, not {args.scenario}")
    if args.target != TARGET and args.scenario != "csv":
        parser.error(f"--target is for --scenario csv (the CSV's column to predict), not {args.scenario}")
    if args.population is not None and args.clients is not None:
        parser.error("--clients and --population: give one (the number of clients, made one way or the other)")
    if args.population is not None and args.scenario not in POPULATION_SCENARIOS:
        parser.error(f"--population: scenario {args.scenario} is not drawn as a population "
                     f"(one of {', '.join(POPULATION_SCENARIOS)}; else --clients)")
    if args.shard is not None and args.population is None:
        parser.error("--shard: a shard is of a population: give --population K too")
    try:
        shard = None if args.shard is None else parse_shard(args.shard)
        if shard is not None:
            check_shard(*shard, args.population)
    except ValueError as e:
        parser.error(str(e))
    attackers = ATTACKERS if args.attackers is None else args.attackers
    attack = args.attack or "huge"
    tls = tls_from_args(args)
    configure_logging()
    # One line per /train of a thousand clients would bury everything else.
    logging.getLogger("fedavg.client").setLevel(logging.WARNING)
    csv = args.csv.resolve() if args.csv else None  # errors then name the file in full
    try:
        token = shared_token()
        dropout = Dropout(args.dropout, args.seed, args.stragglers, args.straggle_s)
        if args.population is None:
            clients, population = make_clients(args.scenario, 10 if args.clients is None else args.clients,
                                               args.seed, args.samples, csv, attackers, attack, args.target), None
        else:
            clients, population = None, Population.build(args.scenario, args.population, args.seed, args.samples,
                                                         attackers, attack)
            if shard is not None:  # drawn whole, then cut: the same rows whatever the split
                population = population.shard(*shard)
    except (ValueError, OSError) as e:  # a token that cannot work, a scenario that cannot be made
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    description = about(args.scenario) + (f" ({csv}, predicting its column {args.target})"
                                          if args.scenario == "csv" else "")
    if args.scenario == "byzantine":
        description += f": {attackers} attacker(s), attack {attack}: each {ATTACKS[attack]}"
    k = len(clients) if population is None else population.size
    rows = sum(len(c.y) for c in clients) if population is None else int(population.sizes.sum())
    if population is not None:
        description += "; a population (its own draw)"
    if shard is not None:
        description += (f"; shard {shard[0]}/{shard[1]}: clients {population.first + 1}..{population.first + k} of "
                  f"{args.population}")
    if dropout.describe():
        description += f"; simulated {dropout.describe()}"
    app = create_host_app(clients, token, f"{args.scenario}: {description}; K={k}, seed={args.seed}",
                          server_name=args.server_name if tls else None,
                          owner_name=tls_files.own_name(tls.cert) if tls else None, population=population,
                          dropout=dropout if dropout.describe() else None)
    base = base_url(args.host, args.port, tls)
    served = (f"\nclient host: each client answers /train, /evaluate and /secagg/* only to a caller whose "
              f"certificate names {args.server_name!r}") if tls else ""
    serve(app, args.host, args.port, allowed_hosts=args.allowed_host, tls=tls, announce=(
        f"client host: {k} clients ({args.scenario}, seed {args.seed}, "
        f"{rows} samples) at {base}/clients/1 … {base}/clients/{k}\n"
        f"client host: the data: {description}{served}"))
