"""The reader's OpenAPI 3.1 description, served at ``/openapi.json``."""

from __future__ import annotations

from typing import Any

_ERROR = {"$ref": "#/components/schemas/Error"}

PRINTABLE = "printable"
"""The format of ids: no control, format, private-use, unassigned or separator characters but
the space, as events require; JSON Schema's regular expressions cannot say it in a pattern."""


def _errors(*codes: int) -> dict[str, Any]:
    """Error answers; 503 is on every route (overload, a handler past its deadline, Redis)."""
    text = {
        400: "bad request: a parameter out of its range or not an identifier",
        404: "unknown item",
        414: "the URL is longer than 8 KiB",
        503: "overloaded, past the handler deadline, or Redis unavailable; see Retry-After",
    }
    return {
        str(c): {"description": text[c], "content": {"application/json": {"schema": _ERROR}}}
        for c in (*codes, 503)
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
    "description": "ASCII decimal digits; 400 for anything else or out of range",
    "schema": {"type": "integer", "minimum": 1, "maximum": 200, "default": 10},
}


def _path(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": "Percent-encoded UTF-8; 400 unless printable (Python's str.isprintable)",
        "schema": {"type": "string", "minLength": 1, "maxLength": 128, "format": PRINTABLE},
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
                    {
                        "name": "debug",
                        "in": "query",
                        "description": "1 or true adds the stage timings; other values do not",
                        "schema": {"type": "string"},
                    },
                ],
                "responses": {**_ok("Recommendations"), **_errors(400, 414)},
            }
        },
        "/similar/{item_id}": {
            "get": {
                "summary": "Items by cosine of decayed co-occurrence",
                "parameters": [_path("item_id"), _K],
                "responses": {**_ok("Similar"), **_errors(400, 404, 414)},
            }
        },
        "/predict/{user_id}/{item_id}": {
            "get": {
                "summary": "Rating prediction",
                "parameters": [_path("user_id"), _path("item_id")],
                "responses": {**_ok("Prediction"), **_errors(400, 414)},
            }
        },
        "/healthz": {
            "get": {
                "summary": "200 when Redis answers, the snapshot is recent and the loops run",
                "responses": {
                    **_ok("Health"),
                    "503": {
                        "description": "unhealthy (a Health with its error) or overloaded",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "anyOf": [{"$ref": "#/components/schemas/Health"}, _ERROR]
                                }
                            }
                        },
                    },
                },
            }
        },
        "/drift": {
            "get": {
                "summary": "The latest drift detector firings, newest first",
                "responses": {**_ok("Drift"), **_errors()},
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "responses": {
                    "200": {
                        "description": "Prometheus text exposition format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    **_errors(),
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This description",
                "responses": {
                    "200": {
                        "description": "OpenAPI 3.1",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    **_errors(),
                },
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
                "required": ["item_id", "items"],
                "properties": {
                    "item_id": {"type": "string"},
                    "items": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["item_id", "score"],
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
                "required": ["user_id", "item_id", "prediction", "known_user", "known_item"],
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
                "required": ["status", "redis", "snapshot_age_s", "loops"],
                "properties": {
                    "status": {"enum": ["ok", "unhealthy"]},
                    "redis": {"type": "string"},
                    "snapshot_age_s": {
                        "type": ["number", "null"],
                        "description": "null before the first snapshot",
                    },
                    "loops": {
                        "type": "object",
                        "additionalProperties": {
                            "type": "object",
                            "required": ["running", "restarts", "last_error"],
                            "properties": {
                                "running": {"type": "boolean"},
                                "restarts": {"type": "integer"},
                                "last_error": {"type": ["string", "null"]},
                            },
                        },
                    },
                    "error": {"type": "string", "description": "what is wrong, when unhealthy"},
                },
            },
        }
    },
}
