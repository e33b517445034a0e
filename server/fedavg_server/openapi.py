"""The server's OpenAPI 3 document (served at /openapi.json)."""
from __future__ import annotations

from typing import Any

from fedavg.openapi import AUTH_ERROR, ERRORS, SCHEMAS, document, field_schemas, json_content, ref, reply
from fedavg.secagg_graph import COMPLETE_UP_TO
from fedavg.strategies import AGGREGATORS, REPLY_FIELDS, STRATEGIES, Combine, Param
from fedavg.wire import MAX_LOCAL_EPOCHS, SECAGG_SCALE_BITS

from .settings import (
    ADAPTIVE_LR,
    ADAPTIVE_QUANTILE,
    DP_DELTA,
    MAX_CLIENT_TIMEOUT_S,
    MAX_PACE_S,
    MAX_ROUNDS,
    MODEL_AVERAGING,
    RunSettings,
)

# The defaults the document states are the code's own (RunSettings, Combine),
# so the two cannot drift apart; tests/test_protocol_doc.py holds PROTOCOL.md to them.
DEFAULT = RunSettings()
RULE = Combine()

# Runs on one comparison chart (GET /compare.svg; web.py checks it): more lines cannot be told apart.
MAX_COMPARE = 10

RUN_STATUS = {"type": "string", "enum": ["running", "completed", "failed", "diverged", "interrupted",
                                                "budget_exhausted"]}
NOT_FOUND = {"404": reply("no such run", ref("Error"))}
BUSY = {"409": reply("a run is already running (its id is in run_id), or this run cannot be resumed",
                     ref("Error"))}
UNAVAILABLE = {"503": reply("the run history cannot be read or written (corrupt, disk full, deleted)",
                           ref("Error"))}
RUN_ID = [{"name": "run_id", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 0}}]
PLOT_NAMES = ["models", "params", "loss"]


def strategy_params() -> dict[str, Any]:
    """Every strategy's own settings, from their ``Param`` definitions (one
    source: the same bounds the server checks)."""
    out: dict[str, Any] = {}
    for name, kind in STRATEGIES.items():
        for p in kind.params:
            schema = out.setdefault(p.name, {"type": "number", "description": ""})
            schema["description"] += f"{name}: {p.help} (default {p.default:g}). "
            _bounds(schema, p)
    return out


def _bounds(schema: dict[str, Any], p: Param) -> None:
    # The widest bounds any strategy allows; the server checks the strategy's own.
    if p.gt is not None or p.ge is not None:
        low, exclusive = (p.gt, True) if p.gt is not None else (p.ge, False)
        if "minimum" not in schema or low < schema["minimum"]:
            schema["minimum"], schema["exclusiveMinimum"] = low, exclusive
    if p.lt is not None or p.le is not None:
        high, exclusive = (p.lt, True) if p.lt is not None else (p.le, False)
        if "maximum" not in schema or high > schema["maximum"]:
            schema["maximum"], schema["exclusiveMaximum"] = high, exclusive


def server_document(num_clients: int) -> dict[str, Any]:
    schemas = {
        **SCHEMAS,
        "StartRequest": {
            "type": "object", "additionalProperties": False,
            "properties": {
                "rounds": {"type": "integer", "minimum": 1, "maximum": MAX_ROUNDS, "default": DEFAULT.rounds},
                "strategy": {"type": "string", "enum": list(STRATEGIES), "default": "fedavg"},
                "lr": {"type": "number", "minimum": 0, "exclusiveMinimum": True, "default": DEFAULT.lr},
                "local_epochs": {"type": "integer", "minimum": 1, "maximum": MAX_LOCAL_EPOCHS,
                                 "default": DEFAULT.local_epochs},
                "batch_size": {"type": "integer", "minimum": 1, "nullable": True},
                "mu": {"type": "number", "minimum": 0, "default": DEFAULT.mu},
                "fraction": {"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": 1,
                             "default": DEFAULT.fraction},
                "min_clients": {"type": "integer", "minimum": 1, "maximum": num_clients,
                                "default": DEFAULT.min_clients},
                "seed": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1, "nullable": True},
                "init": {**ref("Model"), "nullable": True},
                "pace_s": {"type": "number", "minimum": 0, "maximum": MAX_PACE_S, "default": DEFAULT.pace_s},
                "client_timeout_s": {"type": "number", "minimum": 0, "exclusiveMinimum": True,
                                     "maximum": MAX_CLIENT_TIMEOUT_S, "default": DEFAULT.client_timeout_s},
                "wait": {"type": "boolean", "default": True},
                **strategy_params(),
                "aggregator": {"type": "string", "enum": list(AGGREGATORS), "default": RULE.aggregator,
                               "description": "how client vectors are combined: FedAvg's weighted mean, or a "
                                              "robust rule (not for strategy exact)"},
                "trim": {"type": "number", "minimum": 0, "maximum": 0.5, "exclusiveMaximum": True, "default": RULE.trim,
                         "description": "trimmed_mean: the share cut from each end of every coordinate"},
                "byzantine": {"type": "integer", "minimum": 0, "maximum": max(num_clients - 3, 0),
                              "default": RULE.byzantine,
                              "description": "krum: the attackers tolerated (needs more than byzantine + 2 clients)"},
                "krum_m": {"type": "integer", "minimum": 1, "maximum": max(num_clients, 1), "default": RULE.krum_m,
                           "description": "krum: average the m best (multi-Krum)"},
                "clip_norm": {"type": "number", "minimum": 0, "exclusiveMinimum": True,
                              "description": "bound on each client's update ‖W_k − W_t‖ before combining"},
                "max_weight": {"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": 1,
                               "description": "cap on any one client's share n_k/N (mean only)"},
                "dp": {**ref("DPSettings"), "nullable": True},
                "secagg": {"nullable": True, "description": "secure aggregation: true (defaults), or "
                                                            "{neighbors, threshold, scale_bits}",
                           "oneOf": [{"type": "boolean"}, ref("SecAggSettings")]},
            },
        },
        "SecAggSettings": {
            "type": "object", "additionalProperties": False,
            "properties": {
                "neighbors": {"type": "integer", "minimum": 1, "maximum": max(num_clients - 1, 1),
                              "description": "k: each client masks with and shares its secrets among k others "
                                             "(SecAgg+; at most the clients a round asks − 1, the complete graph "
                                             f"and the default up to {COMPLETE_UP_TO} clients, else 2⌈log2 n⌉)"},
                "threshold": {"type": "integer", "minimum": 2,
                              "description": "t: survivors needed in a client's neighbourhood of k + 1 to unmask "
                                             "it (default: a majority of k + 1; at most k + 1)"},
                "scale_bits": {"type": "integer", "minimum": 8, "maximum": 40, "default": SECAGG_SCALE_BITS,
                               "description": "fixed point: inputs are integers mod 2^64 in units of 2^-scale_bits"},
            },
        },
        "DPSettings": {
            "type": "object", "additionalProperties": False, "required": ["noise_multiplier", "clip"],
            "description": "DP-FedAvg: W_{t+1} = W_t + (Σ_k clip_S(W_k − W_t) + N(0, σ²S²)) / M, M = fraction·K; "
                           f"strategies {', '.join(MODEL_AVERAGING)} with the mean only",
            "properties": {
                "noise_multiplier": {"type": "number", "minimum": 0, "maximum": 1e6, "description": "σ"},
                "clip": {"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": 1e12,
                         "nullable": True, "description": "S, the L2 bound on each update (null = ∞, only with σ = 0)"},
                "delta": {"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": 1,
                          "exclusiveMaximum": True, "default": DP_DELTA},
                "target_epsilon": {"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": 1e6,
                                   "nullable": True,
                                   "description": "the budget: the run stops as budget_exhausted before a round "
                                                  "that would pass it (needs σ > 0)"},
                "local_noise": {"type": "boolean", "default": False,
                                "description": "each client adds N(0, σ²S²/M) itself; the server only sums"},
                "adaptive": {"type": "object", "additionalProperties": False, "nullable": True,
                             "description": "adaptive clipping (Andrew et al., 2021): S tracks a quantile of "
                                            "the update norms",
                             "properties": {
                                 "target_quantile": {"type": "number", "minimum": 0, "exclusiveMinimum": True,
                                                     "maximum": 1, "exclusiveMaximum": True,
                                                     "default": ADAPTIVE_QUANTILE},
                                 "lr": {"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": 10,
                                        "default": ADAPTIVE_LR},
                                 "count_noise": {"type": "number", "minimum": 0, "maximum": 1e6,
                                                 "description": "σ_b, > noise_multiplier/2 (default: max(M/20, σ))"}}},
            },
        },
        "ResumeRequest": {"type": "object", "additionalProperties": False,
                          "properties": {"wait": {"type": "boolean", "default": True},
                                         "clients": {"type": "string", "enum": ["current"],
                                                     "description": "go on with this server's clients when they "
                                                                    "differ from the run's (recorded in the run)"}}},
        "Participant": {"type": "object", "required": ["client_id", "url", "data_size"],
                        "properties": {"client_id": {"type": "string"}, "url": {"type": "string"},
                                       "data_size": {"type": "integer", "minimum": 1},
                                       **field_schemas(REPLY_FIELDS),
                                       "metrics": {**ref("Metrics"), "nullable": True}}},
        "Dropped": {"type": "object", "required": ["client_id", "url", "reason"],
                    "properties": {"client_id": {"type": "string"}, "url": {"type": "string"},
                                   "reason": {"type": "string"}}},
        "Term": {"type": "object", "required": ["client_id", "n_k", "weight", "w", "b"],
                 "properties": {"client_id": {"type": "string"}, "n_k": {"type": "integer"},
                                "weight": {"type": "number", "description": "n_k/N"},
                                "w": {"description": "n_k/N · w_k"}, "b": {"type": "number"}}},
        "Round": {"type": "object",
                  "required": ["round", "participants", "dropped", "N", "terms", "global_model", "federated_loss"],
                  "properties": {"round": {"type": "integer", "minimum": 1},
                                 "global_model_in": ref("Model"),
                                 "participants": {"type": "array", "items": ref("Participant")},
                                 "dropped": {"type": "array", "items": ref("Dropped")},
                                 "N": {"type": "integer", "minimum": 1},
                                 "terms": {"type": "array", "items": ref("Term")},
                                 "global_model": ref("Model"),
                                 "strategy": {"type": "string", "enum": list(STRATEGIES)},
                                 "math": {"type": "array", "items": {"type": "string"},
                                          "description": "the strategy's computation, written out"},
                                 "suspicious": {"type": "array", "description": "clients whose update norm is "
                                                "more than 10× the others' median (a flag, not a verdict)",
                                                "items": {"type": "object"}},
                                 "server_state": {"type": "object", "description": "the strategy's state after "
                                                  "this round (SCAFFOLD's c, FedAdam's m and v, …)"},
                                 "privacy": {"type": "object", "description": "a DP run's: epsilon spent after "
                                             "this round, delta, target_epsilon, clip, noise_multiplier, "
                                             "update_noise_multiplier, noise_std (on the model), "
                                             "expected_clients, and with adaptive clipping unclipped_share "
                                             "and next_clip"},
                                 "federated_loss": {"type": "number", "nullable": True}}},
        "RunSummary": {"type": "object", "required": ["run_id", "status", "settings", "error", "final_model"],
                       "properties": {"run_id": {"type": "integer"}, "status": RUN_STATUS,
                                      "settings": {"type": "object"},
                                      "error": {"type": "string", "nullable": True},
                                      "final_model": {**ref("Model"), "nullable": True},
                                      "current_model": ref("Model"),
                                      "rounds_completed": {"type": "integer"}}},
        "Run": {"type": "object", "required": ["run_id", "status", "settings", "error", "final_model", "rounds"],
                "properties": {"run_id": {"type": "integer"}, "status": RUN_STATUS,
                               "settings": {"type": "object"}, "error": {"type": "string", "nullable": True},
                               "final_model": {**ref("Model"), "nullable": True},
                               "message": {"type": "string"},
                               "final_line": {"type": "string", "description": "the final model as y = w·x + b"},
                               "rounds_completed": {"type": "integer"},
                               "url": {"type": "string"},
                               "warnings": {"type": "array", "items": {"type": "string"},
                                            "description": "clients dropped from rounds they were asked in"},
                               "more": {"type": "boolean",
                                        "description": "GET /runs/<id>: rounds follow this page (ask with since)"},
                               "rounds": {"type": "array", "items": ref("Round")}}},
        "ClientState": {"type": "object", "required": ["url", "client_id", "status", "n_k", "reason"],
                        "properties": {"url": {"type": "string"},
                                       "client_id": {"type": "string",
                                                     "description": "its name; its URL until it has said one"},
                                       "status": {"type": "string", "enum": ["up", "down"]},
                                       "n_k": {"type": "integer", "minimum": 1, "nullable": True},
                                       "num_features": {"type": "integer", "nullable": True},
                                       "reason": {"type": "string", "nullable": True,
                                                  "description": "why it is down"}}},
        "Started": {"type": "object", "required": ["run_id", "status", "url"],
                    "properties": {"run_id": {"type": "integer"}, "status": {"type": "string", "enum": ["running"]},
                                   "url": {"type": "string"}}},
    }
    wait_replies = {"200": reply("the run, when it has ended (wait=true)", ref("Run")),
                    "202": reply("started (wait=false): poll url", ref("Started"))}
    secured = [{}, {"bearer": []}]
    paths = {
        "/start": {"post": {
            "summary": "Start a run of FedAvg rounds.", "security": secured,
            "requestBody": {"required": False, **json_content(ref("StartRequest"))},
            "responses": {**wait_replies, **ERRORS, **AUTH_ERROR, **BUSY, **UNAVAILABLE},
        }},
        "/runs/{run_id}/resume": {"post": {
            "summary": "Continue an interrupted or failed run from its last completed round.",
            "security": secured, "parameters": RUN_ID,
            "requestBody": {"required": False, **json_content(ref("ResumeRequest"))},
            "responses": {**wait_replies, **ERRORS, **AUTH_ERROR, **BUSY, **NOT_FOUND},
        }},
        "/runs/{run_id}/stop": {"post": {
            "summary": "Stop the running run after its current round (it then reads interrupted).",
            "security": secured, "parameters": RUN_ID,
            "requestBody": {"required": False, **json_content({"type": "object", "additionalProperties": False})},
            "responses": {"202": reply("stopping", {"type": "object", "required": ["run_id", "status", "url"],
                                                    "properties": {"run_id": {"type": "integer"},
                                                                   "status": {"type": "string", "enum": ["stopping"]},
                                                                   "url": {"type": "string"}}}),
                          **ERRORS, **AUTH_ERROR, **NOT_FOUND,
                          "409": reply("the run is not running", ref("Error"))},
        }},
        "/runs/{run_id}": {"get": {
            "summary": "One run with all its rounds (JSON), or one CSV row per round.",
            "parameters": RUN_ID + [{"name": "format", "in": "query", "required": False,
                                     "schema": {"type": "string", "enum": ["json", "csv"]}},
                                    {"name": "since", "in": "query", "required": False,
                                     "description": "only the rounds after this round (live polling, paging)",
                                     "schema": {"type": "integer", "minimum": 0, "default": 0}},
                                    {"name": "limit", "in": "query", "required": False,
                                     "description": "at most this many rounds (JSON); `more` says if others follow",
                                     "schema": {"type": "integer", "minimum": 1, "maximum": 10000,
                                                "default": 1000}}],
            "responses": {"200": {"description": "the run",
                                  "content": {"application/json": {"schema": ref("Run")},
                                              "text/csv": {"schema": {"type": "string"}}}},
                          "400": ERRORS["400"], **NOT_FOUND, **UNAVAILABLE},
        }},
        "/runs": {"get": {"summary": "Every run, newest first, without rounds.",
                          "responses": {"200": reply("the runs", {
                              "type": "object", "required": ["runs"],
                              "properties": {"runs": {"type": "array", "items": ref("RunSummary")}}}),
                                        **UNAVAILABLE}}},
        "/status": {"get": {"summary": "Seed-compatible: the current global model and the rounds planned.",
                            "responses": {"200": reply("status", {
                                "type": "object",
                                "description": "with the run history unreadable: status and run_id from memory, "
                                               "and error",
                                "required": ["run_id", "status"],
                                "properties": {"current_global_model": ref("Model"),
                                               "global_rounds_planned": {"type": "integer"},
                                               "run_id": {"type": "integer", "nullable": True},
                                               "round": {"type": "integer"},
                                               "status": {"type": "string"},
                                               "error": {"type": "string"}}})}}},
        "/health": {"get": {"summary": "Liveness, the configured clients, the running run.",
                            "responses": {"200": reply("ok", {
                                "type": "object", "required": ["status", "clients", "running_run_id"],
                                "properties": {"status": {"type": "string", "enum": ["ok"]},
                                               "clients": {"type": "array", "items": {"type": "string"}},
                                               "running_run_id": {"type": "integer", "nullable": True}}})}}},
        "/openapi.json": {"get": {"summary": "This document.",
                                  "responses": {"200": reply("OpenAPI 3 document", {"type": "object"})}}},
        "/": {"get": {"summary": "The web page: the federation, a form to start a run, runs live with their "
                                 "arithmetic and charts.",
                      "responses": {"200": {"description": "the page",
                                            "content": {"text/html": {"schema": {"type": "string"}}}}}}},
        "/clients": {"get": {"summary": "Each configured client's /health, probed now, concurrently.",
                             "responses": {"200": reply("the clients, in configuration order", {
                                 "type": "object", "required": ["clients"],
                                 "properties": {"clients": {"type": "array", "items": ref("ClientState")}}})}}},
        "/runs/{run_id}/plots/{name}.svg": {"get": {
            "summary": "A chart of the run, drawn by matplotlib: models (the model lines of a round), params "
                       "(w and b per round), loss (federated loss per round, log scale).",
            "parameters": RUN_ID + [
                {"name": "name", "in": "path", "required": True, "schema": {"type": "string", "enum": PLOT_NAMES}},
                {"name": "round", "in": "query", "required": False,
                 "description": "the round whose model lines to draw (default: the last); marked on the others",
                 "schema": {"type": "integer", "minimum": 1}}],
            "responses": {"200": {"description": "the chart",
                                  "content": {"image/svg+xml": {"schema": {"type": "string"}}}},
                          "400": ERRORS["400"],
                          "404": reply("no such run, or no such chart", ref("Error"))},
        }},
        "/compare.svg": {"get": {
            "summary": "Several runs' federated loss per round on one chart (log scale), one line per run "
                       "labelled \"run N: strategy\", drawn by matplotlib; below it each run's distance to the "
                       "pooled optimum θ* when a chosen exact run (no ridge) took the same clients with the same n_k.",
            "parameters": [{"name": "runs", "in": "query", "required": True,
                            "description": f"the run ids, separated by commas (at most {MAX_COMPARE})",
                            "schema": {"type": "string", "pattern": f"^[0-9]+(,[0-9]+){{0,{MAX_COMPARE - 1}}}$"},
                            "example": "1,2"}],
            "responses": {"200": {"description": "the chart",
                                  "content": {"image/svg+xml": {"schema": {"type": "string"}}}},
                          "400": ERRORS["400"],
                          "404": reply("one of the runs does not exist", ref("Error"))},
        }},
    }
    return document("Raw FedAvg server", paths, schemas)
