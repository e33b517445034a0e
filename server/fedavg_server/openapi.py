"""The server's OpenAPI 3 document (served at /openapi.json)."""
from __future__ import annotations

from typing import Any

from fedavg.openapi import AUTH_ERROR, ERRORS, SCHEMAS, document, field_schemas, json_content, ref, reply
from fedavg.secagg_graph import COMPLETE_UP_TO
from fedavg.spec import object_schema
from fedavg.strategies import REPLY_FIELDS, STRATEGIES

from .privacy_settings import AdaptiveClipping, DPSettings, SecAggSettings
from .records import SUMMARY_ABOVE
from .settings import MODEL_AVERAGING, start_params

# Every setting's schema comes from its declaration (fedavg.spec.Param): the
# bounds and defaults are the code's own; docs/PROTOCOL.md's tables too.

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


def server_document(num_clients: int) -> dict[str, Any]:
    schemas = {
        **SCHEMAS,
        "StartRequest": object_schema(start_params(num_clients)),
        "SecAggSettings": object_schema(
            [SecAggSettings.SPEC[0].bounded(le=max(num_clients - 1, 1)), *SecAggSettings.SPEC[1:]],
            f"k neighbours each (the complete graph and the default up to {COMPLETE_UP_TO} clients, else 2⌈log2 n⌉)"),
        "DPSettings": object_schema(DPSettings.SPEC, "DP-FedAvg: W_{t+1} = W_t + (Σ_k clip_S(W_k − W_t) + "
                                    "N(0, σ²S²)) / M, M = fraction·K; strategies "
                                    f"{', '.join(MODEL_AVERAGING)} with the mean only",
                                    required=("noise_multiplier", "clip")),
        "AdaptiveClipping": object_schema(AdaptiveClipping.SPEC, AdaptiveClipping.__doc__.split("\n\n")[0]),
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
                                 "server_memo": {"type": "object", "description": "what else the strategy's next "
                                                 "round depends on, for a resume (SCAFFOLD's N, the Σ n_k its c is "
                                                 "divided by, and the clients not counted in it yet: uncounted)"},
                                 "privacy": {"type": "object", "description": "a DP run's: epsilon spent after "
                                             "this round, delta, target_epsilon, clip, noise_multiplier, "
                                             "update_noise_multiplier, noise_std (on the model), "
                                             "expected_clients, with adaptive clipping unclipped_share "
                                             "and next_clip, and with local_noise sampled (the clients "
                                             "that had a share of the noise), noise_shares_in_sum and "
                                             "server_noise_share (the shares the server added for those "
                                             "lost)"},
                                 "summary": ref("RoundSummary"),
                                 "federated_loss": {"type": "number", "nullable": True}}},
        "RoundSummary": {
            "type": "object", "description": f"a round of more than {SUMMARY_ABOVE} participants: its record lists "
                                             "no participant and no term and names only the first few dropped; "
                                             "every client is in GET /runs/{run_id}/rounds/{round}/clients.csv",
            "required": ["sampled", "contributed", "dropped", "suspicious", "dropped_by_reason", "sums", "groups",
                         "top"],
            "properties": {"sampled": {"type": "integer"}, "contributed": {"type": "integer"},
                           "dropped": {"type": "integer"},
                           "suspicious": {"type": "integer", "description": "updates flagged far larger than the "
                                          "others'; the round's suspicious list holds the 20 largest"},
                           "dropped_by_reason": {"type": "array", "items": {
                               "type": "object", "required": ["reason", "clients"],
                               "properties": {"reason": {"type": "string"}, "clients": {"type": "integer"}}}},
                           "sums": {"type": "object", "description": "Σ_k n_k·x_k of each model-shaped field the "
                                                                     "clients sent (the operator's)",
                                    "additionalProperties": ref("Model")},
                           "groups": {"type": "object", "nullable": True,
                                      "description": "Σ_k n_k/N·x_k of the clients' update as Σ_g N_g/N·x̄_g, the "
                                                     "clients grouped by n_k in powers of two (the means: the "
                                                     "operator's)",
                                      "properties": {"field": {"type": "string"}, "N": {"type": "integer"},
                                                     "mean": {**ref("Model"), "nullable": True},
                                                     "groups": {"type": "array", "items": {"type": "object"}}}},
                           "top": {"type": "array", "description": "the participants of the largest weight n_k/N",
                                   "items": ref("Participant")}}},
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
                                        "description": "rounds follow this page (ask GET /runs/<id> with since)"},
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
            "summary": "One run with a page of its rounds (JSON: ?limit= rounds, at most 2 MiB), or one CSV row "
                       "per round.",
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
        "/runs/{run_id}/rounds/{round}/clients.csv": {"get": {
            "summary": "Every client of one round, a CSV row each: client_id, url, n_k, weight (n_k/N), what its "
                       "strategy's reply carries and its losses (shown to the operator, as in GET /runs/{run_id}), "
                       "and dropped (why it was left out). The whole list of a round its record summarises.",
            "parameters": RUN_ID + [{"name": "round", "in": "path", "required": True,
                                     "schema": {"type": "integer", "minimum": 0}}],
            "responses": {"200": {"description": "the round's clients",
                                  "content": {"text/csv": {"schema": {"type": "string"}}}},
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
                                               "clients_total": {"type": "integer", "minimum": 0},
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
