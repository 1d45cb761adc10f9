"""Assertions on MemFuse's response envelope ``{status, code, data, message, errors}``."""

from __future__ import annotations

ENVELOPE_KEYS = {"status", "code", "data", "message", "errors"}


def assert_success(response, code: int = 200) -> dict:
    """Assert a success envelope with HTTP status ``code``; returns its ``data``."""
    assert response.status_code == code, response.content
    assert response["Content-Type"].startswith("application/json")
    body = response.json()
    assert set(body) == ENVELOPE_KEYS
    assert body["status"] == "success"
    assert body["code"] == code
    assert body["errors"] is None
    assert isinstance(body["message"], str) and body["message"]
    return body["data"]


def assert_error(response, code: int, field: str | None) -> dict:
    """Assert an error envelope with HTTP status ``code`` whose errors name ``field``; returns the body.

    ``field=None`` means an error about the request as a whole.
    """
    assert response.status_code == code, response.content
    assert response["Content-Type"].startswith("application/json")
    body = response.json()
    assert set(body) == ENVELOPE_KEYS
    assert body["status"] == "error"
    assert body["code"] == code
    assert body["data"] is None
    assert isinstance(body["message"], str) and body["message"]
    assert isinstance(body["errors"], list) and body["errors"]
    for error in body["errors"]:
        assert set(error) == {"field", "message"}
        assert isinstance(error["message"], str) and error["message"]
    assert field in [error["field"] for error in body["errors"]], body["errors"]
    return body
