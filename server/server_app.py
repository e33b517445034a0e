"""The server: orchestrates FedAvg rounds over the clients, port 5000.

Run: cd server && poetry install && poetry run python server_app.py
Then: curl -X POST http://127.0.0.1:5000/start
"""
import json
import ssl
import sys
import time
import urllib.error
import urllib.request

try:
    from fedavg.batch_wire import POPULATION_PATH
    from fedavg.http.service import base_url, cli, configure_logging, serve, shared_token, tls_from_args
    from fedavg.strict_json import ProtocolError
    from fedavg.tls_files import TLSFiles
    from fedavg_server import client_urls, create_app
    from fedavg_server.hosted import ClientURLs, HostedPopulation, parse_population
    from fedavg_server.http_transport import caller_context
    from fedavg_server.runs import StoreError
except ModuleNotFoundError as e:  # a python without the app's Poetry environment: say how to run it
    raise SystemExit(f"error: no module {e.name}; run: {__doc__.split('Run: ')[1].splitlines()[0]}") from None

HOST_WAIT_S = 30  # how long --clients-from waits for the client host to answer


def ask(url: str, token: str | None) -> urllib.request.Request:
    """A GET of ``url``, with the shared token when there is one: a client
    host with a token shows its client list to anyone, its scenario only to
    who has it."""
    return urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})


def tls_context(tls: TLSFiles | None) -> ssl.SSLContext | None:
    """For asking a client host over mutual TLS: the transport's own
    (``caller_context``). None without TLS."""
    return None if tls is None else caller_context(tls)


def curl_credentials(tls: TLSFiles | None, token: str | None) -> str:
    """What curl needs before the URL to start a run over TLS: the CA that
    signed the server's certificate, the operator certificate (make certs
    writes it beside the CA), and the token when one is set
    (access.is_operator). Nothing without TLS: the seed's line stays as it
    was."""
    if tls is None:
        return ""
    folder = tls.ca.parent
    bearer = '-H "Authorization: Bearer $FEDAVG_TOKEN" ' if token is not None else ""
    return f"--cacert {tls.ca} --cert {folder / 'operator.crt'} --key {folder / 'operator.key'} {bearer}"


def outside_line(host_url: str, token: str | None = None, tls: TLSFiles | None = None) -> dict | None:
    """The client host's pooled least-squares line (GET /scenario), for the
    page to draw labelled as outside knowledge; None if it has none to give."""
    try:
        with urllib.request.urlopen(ask(host_url.rstrip("/") + "/scenario", token), timeout=5,
                                    context=tls_context(tls)) as resp:
            body = json.loads(resp.read())
        line = body.get("pooled_line")
        if not (isinstance(line, dict) and all(isinstance(line.get(k), (int, float)) for k in ("w", "b"))):
            return None
        return {"w": float(line["w"]), "b": float(line["b"]), "scenario": str(body.get("scenario", ""))[:200]}
    except (OSError, ValueError, AttributeError):  # an older host, or none: the page draws without it
        return None


def clients_from(host_url: str, wait_s: float = HOST_WAIT_S, token: str | None = None,
                 tls: TLSFiles | None = None) -> list[str] | HostedPopulation:
    """Every client a client host serves: its population, described in one
    reply (GET /population: reached by index, K URLs never made), or when it
    has none (a host of --clients) its GET /clients as full URLs. The host
    may still be starting: ask again until it answers or wait_s ends."""
    base = host_url.rstrip("/")
    context = tls_context(tls)
    if not base.startswith(("http://", "https://")):
        raise ValueError(f"--clients-from must be a client host's URL (http://…), got {host_url!r}")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            try:
                with urllib.request.urlopen(ask(base + POPULATION_PATH, token), timeout=30, context=context) as resp:
                    return parse_population(base, json.loads(resp.read()))
            except urllib.error.HTTPError as e:
                if e.code != 404:  # (404: a host of --clients, listed below)
                    raise ValueError(f"{base}{POPULATION_PATH} answered HTTP {e.code}"
                                     + (" (is FEDAVG_TOKEN the host's?)" if e.code in (401, 403) else "")) from None
            except ProtocolError as e:
                raise ValueError(f"{base}{POPULATION_PATH}: {e}") from None
            with urllib.request.urlopen(ask(base + "/clients", token), timeout=5, context=context) as resp:
                paths = json.loads(resp.read())["clients"]
            if not paths or not all(isinstance(p, str) and p.startswith("/") for p in paths):
                raise ValueError(f"{base}/clients lists no clients: {paths!r}")
            return [base + p for p in paths]
        except urllib.error.HTTPError as e:
            raise ValueError(f"{base}/clients answered HTTP {e.code}: is {base} a client host "
                             "(cd client_host && poetry run python client_host_app.py)?") from None
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{base}/clients is not a client host's list of clients") from None
        except (urllib.error.URLError, OSError) as e:
            if time.monotonic() > deadline:
                raise ValueError(f"no client host answers at {base} within {wait_s:g} s "
                                 f"({getattr(e, 'reason', e)}); start it first: cd client_host && "
                                 "poetry run python client_host_app.py --port <its port>") from None
            time.sleep(0.2)  # polling interval while the host starts


if __name__ == "__main__":
    parser = cli("Raw FedAvg server", 5000)
    parser.add_argument("--clients",
                        help="comma-separated client URLs (default: env FEDAVG_CLIENTS, "
                             "else http://127.0.0.1:5001,http://127.0.0.1:5002)")
    parser.add_argument("--clients-from", metavar="HOST_URL", action="append",
                        help="a client host's URL, e.g. http://127.0.0.1:6000: use every client it serves "
                             "(its GET /population, a population reached by index; else its GET /clients); "
                             "repeat it or separate URLs by commas for several hosts (shards); adds to "
                             "--clients if given")
    parser.add_argument("--clients-from-wait", type=float, default=HOST_WAIT_S, metavar="SECONDS",
                        help=f"how long to wait for that host to answer (default {HOST_WAIT_S})")
    parser.add_argument("--max-parallel", type=int, default=None,
                        help="at most this many client calls at once (default: sized for this machine)")
    parser.add_argument("--public-read", action="store_true",
                        help="with FEDAVG_TOKEN set, still show every client's own numbers (local models, "
                             "losses) to anyone who can reach the server: the teaching view, for a demo on one "
                             "machine; without it they need the token")
    parser.add_argument("--per-client", action="store_true",
                        help="call each client's own /train, even on a client host that answers for all its "
                             "clients in one call (/batch/train, the default there)")
    parser.add_argument("--db",
                        help="SQLite file of the run history (default: env FEDAVG_DB, else instance/fedavg.db)")
    args = parser.parse_args()
    tls = tls_from_args(args)
    configure_logging()
    # What the command line says; create_app reads FEDAVG_* for the rest. TLS:
    # the files the server presents, and checks its clients against, when it calls them.
    config = {"TLS": tls}
    try:
        if args.clients_from:
            token = shared_token()
            hosts = [u.strip() for value in args.clients_from for u in value.split(",") if u.strip()]
            parts: list = client_urls(args.clients) if args.clients else []
            for host in hosts:
                hosted = clients_from(host, args.clients_from_wait, token, tls)
                parts += [hosted] if isinstance(hosted, HostedPopulation) else hosted
                count = hosted.size if isinstance(hosted, HostedPopulation) else len(hosted)
                print(f"server: {count} client(s) from the client host at {host}"
                      + (" (a population, reached by index)" if isinstance(hosted, HostedPopulation) else ""),
                      flush=True)
            clients = ClientURLs(parts)
            config["CLIENTS"] = clients if clients.hosts else list(clients)
            line = outside_line(hosts[0], token, tls) if len(hosts) == 1 else None
            if line is not None:
                config["OUTSIDE_LINE"] = {**line, "clients": config["CLIENTS"]}
        elif args.clients:
            config["CLIENTS"] = client_urls(args.clients)
        if args.db:
            config["DB"] = args.db
        if args.max_parallel:
            config["MAX_PARALLEL"] = args.max_parallel
        if args.public_read:
            config["PUBLIC_READ"] = True
        if args.per_client:
            config["BATCHED"] = False
        app = create_app(config)
    except (ValueError, StoreError) as e:  # bad URLs or settings, a history that cannot be opened: one line
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    clients = app.config["CLIENTS"]
    base = base_url(args.host, args.port, tls)
    shown = ", ".join(clients) if len(clients) <= 4 else f"{clients[0]} … {clients[-1]}"
    try:
        # Its own connections out: about one kept alive per client, and one per call in flight.
        kept = len(clients.stand_ins()) if isinstance(clients, ClientURLs) else len(clients)  # (a host: one pool)
        outgoing = kept + max(1, app.config["MAX_PARALLEL"])
        # Over TLS its callers need no certificate to read what everyone may
        # (a browser, curl); operating takes the operator certificate (access.py).
        serve(app, args.host, args.port, allowed_hosts=args.allowed_host, outgoing=outgoing, tls=tls,
              callers_need_certificate=False, announce=(
                  f"server: {len(clients)} client(s): {shown}; run history in {app.config['DB']}; "
                  f"serving on {base}\n"
                  f"server: the page: {base}/\n"
                  f"server: start a run with  curl {curl_credentials(tls, app.config['TOKEN'])}-X POST {base}/start"))
    finally:
        # Ctrl-C or SIGTERM: a running run finishes its round and reads
        # "interrupted" (resumable), instead of dying half-way.
        app.extensions["fedavg"].shutdown()
