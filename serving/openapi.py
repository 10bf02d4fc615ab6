"""The reader's OpenAPI 3.1 description, served at ``/openapi.json``."""

from __future__ import annotations

from typing import Any

_ERROR = {"$ref": "#/components/schemas/Error"}


def _errors(*codes: int) -> dict[str, Any]:
    text = {400: "bad request", 404: "unknown route or item", 503: "Redis unreachable"}
    return {
        str(c): {"description": text[c], "content": {"application/json": {"schema": _ERROR}}}
        for c in codes
    }


def _ok(schema: str) -> dict[str, Any]:
    return {
        "200": {
            "description": "ok",
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
        }
    }


_K = {
    "name": "k",
    "in": "query",
    "schema": {"type": "integer", "minimum": 1, "maximum": 200, "default": 10},
}


def _path(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "schema": {"type": "string", "maxLength": 128},
    }


OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "freshrec reader", "version": "0.1.0"},
    "paths": {
        "/recommendations/{user_id}": {
            "get": {
                "summary": "Fresh top-k for a user through recall, coarse, fine and rerank",
                "parameters": [
                    _path("user_id"),
                    _K,
                    {"name": "debug", "in": "query", "schema": {"type": "string", "enum": ["1"]}},
                ],
                "responses": {**_ok("Recommendations"), **_errors(400, 503)},
            }
        },
        "/similar/{item_id}": {
            "get": {
                "summary": "Items by cosine of decayed co-occurrence",
                "parameters": [_path("item_id"), _K],
                "responses": {**_ok("Similar"), **_errors(400, 404, 503)},
            }
        },
        "/predict/{user_id}/{item_id}": {
            "get": {
                "summary": "MF rating prediction",
                "parameters": [_path("user_id"), _path("item_id")],
                "responses": {**_ok("Prediction"), **_errors(400, 503)},
            }
        },
        "/healthz": {
            "get": {
                "summary": "200 when Redis answers",
                "responses": {**_ok("Health"), **_errors(503)},
            }
        },
        "/drift": {
            "get": {
                "summary": "The latest drift detector firings, newest first",
                "responses": {**_ok("Drift"), **_errors(503)},
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "responses": {"200": {"description": "text exposition format"}},
            }
        },
    },
    "components": {
        "schemas": {
            "Drift": {
                "type": "object",
                "required": ["firings"],
                "properties": {
                    "firings": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["signal", "detector", "ts", "position", "before", "after"],
                            "properties": {
                                "signal": {"type": "string"},
                                "detector": {"enum": ["adwin", "page_hinkley"]},
                                "ts": {"type": "number", "description": "event time (unix s)"},
                                "position": {"type": "integer"},
                                "before": {"type": "number"},
                                "after": {"type": "number"},
                            },
                        },
                    }
                },
            },
            "Error": {
                "type": "object",
                "required": ["error", "status"],
                "properties": {"error": {"type": "string"}, "status": {"type": "integer"}},
            },
            "Item": {
                "type": "object",
                "required": ["item_id", "score", "channels", "explanation"],
                "properties": {
                    "item_id": {"type": "string"},
                    "score": {"type": "number"},
                    "channels": {
                        "type": "array",
                        "items": {"enum": ["cf", "mf", "trending", "cold", "explore"]},
                    },
                    "explanation": {"type": "string"},
                    "because": {"type": "string"},
                },
            },
            "Recommendations": {
                "type": "object",
                "required": ["user_id", "k", "request_id", "variant", "items"],
                "properties": {
                    "user_id": {"type": "string"},
                    "k": {"type": "integer"},
                    "request_id": {"type": "string"},
                    "variant": {"type": "string"},
                    "items": {"type": "array", "items": {"$ref": "#/components/schemas/Item"}},
                    "latest_event_ts": {"type": ["number", "null"]},
                    "took_ms": {"type": "number"},
                    "debug": {"type": "object"},
                },
            },
            "Similar": {
                "type": "object",
                "properties": {
                    "item_id": {"type": "string"},
                    "items": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "item_id": {"type": "string"},
                                "score": {"type": "number"},
                            },
                        },
                    },
                },
            },
            "Prediction": {
                "type": "object",
                "properties": {
                    "user_id": {"type": "string"},
                    "item_id": {"type": "string"},
                    "prediction": {"type": "number"},
                    "known_user": {"type": "boolean"},
                    "known_item": {"type": "boolean"},
                },
            },
            "Health": {
                "type": "object",
                "properties": {"status": {"type": "string"}, "redis": {"type": "string"}},
            },
        }
    },
}
