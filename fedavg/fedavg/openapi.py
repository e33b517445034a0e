"""OpenAPI 3 descriptions of the wire format: the schemas both sides share and
the client's document (served at /openapi.json). The server's document builds
on ``SCHEMAS`` (fedavg_server.openapi)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .spec import object_schema
from .strategies import REPLY_FIELDS, SENT_FIELDS, STRATEGIES, Field
from .strict_json import MAX_FEATURES
from .wire import SECAGG_SCALE_BITS, SECAGG_SCALE_RANGE, TRAIN_CONFIG, TRAIN_DP

NUMBER = {"type": "number"}

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object", "required": ["error"],
        "properties": {"error": {"type": "string"}, "diverged": {"type": "boolean"},
                       "run_id": {"type": "integer"}, "url": {"type": "string"},
                       "errors": {"type": "array", "items": {"type": "object"}}},
    },
    "Model": {
        "type": "object", "required": ["w", "b"], "additionalProperties": False,
        "description": "y = w·x + b; w is a number with one feature, a list with several.",
        "properties": {
            "w": {"oneOf": [NUMBER, {"type": "array", "items": NUMBER, "minItems": 1,
                                     "maxItems": MAX_FEATURES}]},
            "b": NUMBER,
        },
    },
    # /train's config, field by field from its declarations (fedavg.wire): the defaults are the seed's own.
    "TrainConfig": object_schema(TRAIN_CONFIG),
    "TrainDP": object_schema(TRAIN_DP, "a DP run's: clip W_k − W_t to L2 norm `clip`, then add N(0, noise_std²) to "
                                       "each coordinate, before replying"),
    "Metrics": {
        "type": "object",
        "properties": {"loss_before": {"type": "number", "minimum": 0, "nullable": True},
                       "loss_after": {"type": "number", "minimum": 0}},
    },
}


def field_schemas(fields: Sequence[Field]) -> dict[str, Any]:
    """Each field a strategy declares (``fedavg.strategies.fields``), as its kind describes it."""
    return {f.name: {**f.kind.schema(), "description": f.help} for f in fields}


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def json_content(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def reply(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, **json_content(schema)}


ERRORS = {
    "400": reply("bad input: what and where", ref("Error")),
    "413": reply("request body too large", ref("Error")),
}
AUTH_ERROR = {"401": reply("missing or wrong bearer token (only when FEDAVG_TOKEN is set); on a server serving TLS, "
                           "also no certificate naming operator", ref("Error"))}
# A client's or host's steps over TLS (service.require_peer).
PEER_ERROR = {"403": reply("served over TLS: the caller's verified certificate does not name the server "
                           "(--server-name)", ref("Error"))}


def document(title: str, paths: dict[str, Any], schemas: dict[str, Any]) -> dict[str, Any]:
    return {
        "openapi": "3.0.3",
        "info": {"title": title, "version": "1.0"},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def model_schema(num_features: int) -> dict[str, Any]:
    """The Model schema for data with exactly ``num_features`` features."""
    w = NUMBER if num_features == 1 else {"type": "array", "items": NUMBER, "minItems": num_features,
                                          "maxItems": num_features}
    return {**SCHEMAS["Model"], "properties": {"w": w, "b": NUMBER}}


def client_document(num_features: int) -> dict[str, Any]:
    """The client's endpoints: /train, /evaluate, /health; models sized for its data."""
    model_in = {"type": "object", "required": ["global_model"], "additionalProperties": False,
                "properties": {"global_model": ref("Model"),
                               "round": {"type": "integer", "minimum": 0, "nullable": True}}}
    train_in = {**model_in, "properties": {**model_in["properties"],
                                           "config": {**ref("TrainConfig"), "nullable": True},
                                           **field_schemas(SENT_FIELDS)}}
    diverged = {"422": reply("local training diverged (non-finite model): use a smaller lr", ref("Error"))}
    secured = [{}, {"bearer": []}]
    schemas = {
        **SCHEMAS,
        "Model": model_schema(num_features),
        "TrainReply": {"type": "object", "required": ["data_size", "client_id", "metrics"],
                       "description": "local_model for fedavg (the seed's reply); other strategies also name "
                                      "themselves and send their own fields",
                       "properties": {"data_size": {"type": "integer", "minimum": 1},
                                      "client_id": {"type": "string"}, "metrics": ref("Metrics"),
                                      "strategy": {"type": "string", "enum": list(STRATEGIES)},
                                      **field_schemas(REPLY_FIELDS)}},
        "EvaluateReply": {"type": "object", "required": ["loss", "data_size", "client_id"],
                          "properties": {"loss": {"type": "number", "minimum": 0},
                                         "data_size": {"type": "integer", "minimum": 1},
                                         "client_id": {"type": "string"}}},
        "ClientHealth": {"type": "object", "required": ["status", "client_id", "data_size", "num_features"],
                         "properties": {"status": {"type": "string", "enum": ["ok"]},
                                        "client_id": {"type": "string"},
                                        "data_size": {"type": "integer", "minimum": 1},
                                        "num_features": {"type": "integer", "minimum": 1},
                                        "strategies": {"type": "array",
                                                       "items": {"type": "string", "enum": list(STRATEGIES)}},
                                        "secagg": {"type": "boolean",
                                                   "description": "it speaks secure aggregation (/secagg/*)"},
                                        "x_range": {"type": "array", "items": NUMBER, "minItems": 2, "maxItems": 2,
                                                    "description": "min and max of the first feature"},
                                        "batch": {"type": "object", "required": ["path", "id"],
                                                  "description": "a hosted client: its host answers /train for "
                                                                 "many of its clients at this path (of the "
                                                                 "host's origin), naming it by id",
                                                  "properties": {"path": {"type": "string"},
                                                                 "id": {"type": "integer", "minimum": 1}}}}},
    }
    paths = {
        "/train": {"post": {
            "summary": "Train locally from the global model; reply with the local model and n_k.",
            "security": secured,
            "requestBody": {"required": True, **json_content(ref("TrainRequest"))},
            "parameters": [{"name": "X-Deadline-S", "in": "header", "required": False,
                            "description": "seconds the server will wait for this call; training stops then",
                            "schema": {"type": "number", "minimum": 0, "exclusiveMinimum": True,
                                       "maximum": 3600}}],
            "responses": {"200": reply("the local model", ref("TrainReply")), **ERRORS, **AUTH_ERROR, **PEER_ERROR,
                          **diverged,
                          "429": reply("busy: as many trainings as it takes at once are in progress",
                                       ref("Error")),
                          "408": reply("the caller's deadline (X-Deadline-S) passed before training ended",
                                       ref("Error"))},
        }},
        "/evaluate": {"post": {
            "summary": "MSE of a model on this client's data.",
            "security": secured,
            "requestBody": {"required": True, **json_content(model_in)},
            "responses": {"200": reply("the loss", ref("EvaluateReply")), **ERRORS, **AUTH_ERROR, **PEER_ERROR,
                          **diverged},
        }},
        "/health": {"get": {"summary": "Liveness, name and data size.",
                            "responses": {"200": reply("ok", ref("ClientHealth"))}}},
        "/openapi.json": {"get": {"summary": "This document.",
                                  "responses": {"200": reply("OpenAPI 3 document", {"type": "object"})}}},
        **secagg_paths(train_in, secured, diverged),
    }
    schemas["TrainRequest"] = train_in
    return document("Raw FedAvg client", paths, schemas)


def secagg_paths(train_in: dict[str, Any], secured: list[dict[str, Any]],
                 diverged: dict[str, Any]) -> dict[str, Any]:
    """Secure aggregation's five requests (fedavg.secure_client). Keys,
    shares and ciphertexts are base64 text; a masked vector is the base64 of
    its little-endian uint64 words; objects of them are keyed by client
    index as decimal text."""
    session = {"type": "string", "minLength": 1, "maxLength": 200,
               "description": "names this round's protocol run; fresh every attempt"}
    b64 = {"type": "string", "description": "base64"}
    indices = {"type": "array", "items": {"type": "integer", "minimum": 0}}
    by_index = {"type": "object", "additionalProperties": b64}
    keys = {"type": "object", "required": ["c_pk", "s_pk"], "additionalProperties": False,
            "properties": {"c_pk": b64, "s_pk": b64, "b_commit": b64}}

    def step(summary: str, body: dict[str, Any], required: list[str], answer: dict[str, Any],
             extra: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"post": {"summary": summary, "security": secured,
                         "requestBody": {"required": True, **json_content(
                             {"type": "object", "additionalProperties": False, "required": ["session", *required],
                              "properties": {"session": session, **body}})},
                         "responses": {"200": reply("the step's answer", answer), **ERRORS, **AUTH_ERROR, **PEER_ERROR,
                                       **(extra or {})}}}

    advertise = {**train_in["properties"],
                 "index": {"type": "integer", "minimum": 1}, "threshold": {"type": "integer", "minimum": 2},
                 "scale_bits": {"type": "integer", "minimum": SECAGG_SCALE_RANGE[0], "maximum": SECAGG_SCALE_RANGE[1],
                                "default": SECAGG_SCALE_BITS},
                 "evaluate": {"type": "boolean", "description": "no training: the input is [0, 0, n_k·L_k, n_k, 0]"},
                 "equal_weights": {"type": "boolean", "default": False,
                                   "description": "w_k = 1, not n_k (DP-FedAvg sums the updates unweighted)"}}
    late = {"408": reply("the caller no longer waits (its X-Deadline-S passed, or it hung up): the step was "
                         "stopped, and nothing of it kept", ref("Error"))}
    busy = {"429": reply("busy: as many trainings as it takes at once are in progress", ref("Error")), **late}
    return {
        "/secagg/advertise": step(
            "Secure aggregation 0: train, keep the input x_k = [w_k·θ_k, w_k, n_k·L_k, n_k, bit_k]; send two "
            "X25519 public keys and SHA-256(b_k).", advertise, ["index", "threshold", "global_model"],
            {"type": "object", "required": ["client_id", "keys", "length"],
             "properties": {"client_id": {"type": "string"}, "keys": keys, "length": {"type": "integer"}}},
            {**diverged, **busy}),
        "/secagg/share": step(
            "Secure aggregation 1: its neighbourhood's keys in (every other client's in the complete graph); "
            "Shamir shares of s_sk_k and b_k out, each sealed (AES-GCM) to its holder.",
            {"peers": {"type": "object", "additionalProperties": keys}}, ["peers"],
            {"type": "object", "required": ["shares"], "properties": {"shares": by_index}}, late),
        "/secagg/receive": step(
            "Secure aggregation 2: the shares sealed to this client in; how many opened out, or, when some do "
            "not, their senders (bad_shares) and c_sk_k, with which the server checks that they do not open; "
            "then this session masks nothing.",
            {"survivors": indices, "received": by_index}, ["survivors", "received"],
            {"oneOf": [{"type": "object", "required": ["opened"], "properties": {"opened": {"type": "integer"}}},
                       {"type": "object", "required": ["bad_shares", "c_sk"], "properties": {"bad_shares": {
                           "type": "object", "additionalProperties": {"type": "string"},
                           "description": "sender index → why its sealed shares did not open"},
                           "c_sk": {**b64, "description": "base64: this session's c_sk_k, the proof"}}}]},
            late),
        "/secagg/masked": step(
            "Secure aggregation 3: who of its neighbourhood shared keys in; y_k = x_k + PRG(b_k) ± PRG(s_kj) out.",
            {"survivors": indices, "parties": {"type": "integer", "minimum": 1}}, ["survivors"],
            {"type": "object", "required": ["masked"], "properties": {"masked": b64}},
            {**late, "422": reply("x_k is beyond what the fixed point can sum (|x| ≥ 2^63 / 2^s / parties): its "
                                  "model or loss has blown up (diverged: true)", ref("Error"))}),
        "/secagg/unmask": step(
            "Secure aggregation 4: who survived in; shares of b_j (survivors) and of s_sk_j (dropped) out, "
            "never both for one j.", {"survivors": indices, "dropped": indices}, ["survivors", "dropped"],
            {"type": "object", "required": ["b", "s_sk"], "properties": {"b": by_index, "s_sk": by_index}}, late),
    }


def host_document(num_clients: int, num_features: int = 1, batch: bool = True) -> dict[str, Any]:
    """A client host's own endpoints (with ``batch``, POST /batch/train);
    each client under /clients/<k> serves its own document at
    /clients/<k>/openapi.json."""
    client = client_document(num_features)["components"]["schemas"]
    array = {"type": "object", "required": ["dtype", "shape", "data"],
             "properties": {"dtype": {"type": "string", "enum": ["<f8", "<i8", "|b1"]},
                            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                            "data": {"type": "string", "description": "base64 of the little-endian bytes"}}}
    client_k = {"type": "integer", "minimum": 1, "maximum": num_clients}
    batch_in = {**client["TrainRequest"], "required": ["global_model", "clients"],
                "properties": {**client["TrainRequest"]["properties"],
                               "clients": {"type": "array", "items": client_k, "minItems": 1,
                                           "uniqueItems": True},
                               "seeds": {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                                    "maximum": 2**63 - 1}}}}
    batch_out = {"type": "object", "required": ["strategy", "clients", "arrays", "errors"],
                 "properties": {"strategy": {"type": "string", "enum": list(STRATEGIES)},
                                "clients": {"type": "integer", "minimum": 1},
                                "arrays": {"type": "object", "additionalProperties": ref("Array")},
                                "errors": {"type": "object", "additionalProperties": {"type": "string"}},
                                "absent": {"type": "object", "additionalProperties": {"type": "string"}}}}
    paths = {
        "/health": {"get": {"summary": "Liveness and the number of clients here; the scenario and the rows in "
                                       "all only without FEDAVG_TOKEN or with it.", "responses": {"200": reply(
            "ok", {"type": "object", "required": ["status", "clients"],
                   "properties": {"status": {"type": "string", "enum": ["ok"]},
                                  "clients": {"type": "integer", "minimum": 1, "maximum": num_clients},
                                  "scenario": {"type": "string"},
                                  "data_size": {"type": "integer", "minimum": 1},
                                  "calls": {"type": "object", "description": "training calls answered",
                                            "properties": {"batch_train": {"type": "integer", "minimum": 0},
                                                           "train": {"type": "integer", "minimum": 0}}}}})}}},
        "/scenario": {"get": {"summary": "The simulation's pooled least-squares line (one feature), for a page "
                                         "to draw as outside knowledge.", "responses": {"200": reply(
            "the scenario", {"type": "object", "required": ["scenario", "simulated", "clients", "pooled_line"],
                             "properties": {"scenario": {"type": "string"}, "simulated": {"type": "boolean"},
                                            "clients": {"type": "integer", "minimum": 1},
                                            "pooled_line": {"type": "object", "nullable": True,
                                                            "properties": {"w": NUMBER, "b": NUMBER}}}}),
                                                **AUTH_ERROR, **PEER_ERROR}}},
        "/clients": {"get": {"summary": "The path of every client on this host.", "responses": {"200": reply(
            "the paths", {"type": "object", "required": ["clients"],
                          "properties": {"clients": {"type": "array", "items": {"type": "string"}}}})}}},
        "/openapi.json": {"get": {"summary": "This document.",
                                  "responses": {"200": reply("OpenAPI 3 document", {"type": "object"})}}},
    }
    schemas = {"Error": SCHEMAS["Error"]}
    if batch:
        paths["/batch/train"] = {"post": {
            "summary": "/train for many of the clients here in one call: one config (each client's own seed "
                       "in seeds), a reply of arrays, row j for clients[j].",
            "security": [{}, {"bearer": []}],
            "requestBody": {"required": True, **json_content(ref("BatchRequest"))},
            "parameters": [{"name": "X-Deadline-S", "in": "header", "required": False,
                            "description": "seconds the server will wait for this call",
                            "schema": {"type": "number", "minimum": 0, "exclusiveMinimum": True,
                                       "maximum": 3600}}],
            "responses": {"200": reply("each client's reply, as arrays", ref("BatchReply")), **ERRORS, **AUTH_ERROR,
                          **PEER_ERROR,
                          "429": reply("busy: as many batches as it takes at once are in progress", ref("Error")),
                          "408": reply("the caller's deadline (X-Deadline-S) passed", ref("Error"))}}}
        schemas |= client  # the /train body's schemas, which the batch's request is made of
        schemas |= {"BatchRequest": batch_in, "BatchReply": batch_out, "Array": array}
    return document("Raw FedAvg client host", paths, schemas)
