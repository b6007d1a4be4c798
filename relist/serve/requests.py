"""Validation of a /rerank request body into the arrays of one list; every problem is a ``BadRequest``.

A request is JSON::

    {"user": {"id": "U1", "features": {...user sparse fields...},
              "history": [{"item_id": "N1", "category": "news"}, ...]},
     "items": [{"id": "N1", "features": {"category": "news", "ctr": 0.1, "init_score": 2.3, ...}}, ...]}

Item ``features`` take the schema's dense features (numbers, all required) and its sparse fields other
than the id (strings, optional). Raw ids are mapped through the training data's vocabularies; an id the
model never saw becomes 0, the shared "no id" row; a field without a vocabulary (ids that were integers in
the raw data, as in the synthetic source) takes the decimal string of the id. Item order is the initial order.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np

from relist.data.store import PreparedDataset, Schema

_DECIMAL = re.compile(r"0|[1-9][0-9]*", re.ASCII)


class BadRequest(ValueError):
    """A client error: ``status`` is the HTTP code, the message names the problem."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


def _reject_constant(name: str):
    raise BadRequest(f"malformed JSON: {name} is not a number JSON allows", 400)


FLOAT32_MAX = float(np.finfo(np.float32).max)


def parse_json(body: bytes) -> object:
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except BadRequest:
        raise
    except RecursionError:
        raise BadRequest("malformed JSON: nested too deeply", 400) from None
    except (ValueError, UnicodeDecodeError) as err:
        raise BadRequest(f"malformed JSON: {err}", 400) from None


class RequestParser:
    """Turns a parsed body into a ``collate`` example; knows the schema, vocabularies and list-length limit."""

    def __init__(
        self,
        schema: Schema,
        vocabs: dict[str, list[str] | None],
        max_items: int,
        max_history: int = 1000,
        max_id_chars: int = 256,
    ):
        self.schema, self.max_items, self.max_history, self.max_id_chars = schema, max_items, max_history, max_id_chars
        self.index = {
            name: {v: k for k, v in enumerate(values)} for name, values in vocabs.items() if values is not None
        }
        self.sizes = {f.name: f.vocab for f in (*schema.item_sparse, *schema.user_sparse, *schema.user_hist)}
        self.item_sparse = [f.name for f in schema.item_sparse]
        self.dense = list(schema.item_dense)
        self.user_sparse = [f.name for f in schema.user_sparse]
        self.hist = [f.name for f in schema.user_hist]

    def _id(self, field: str, value, where: str) -> int:
        if not isinstance(value, str):
            raise BadRequest(f"{where}: expected a string id, got {type(value).__name__}")
        if len(value) > self.max_id_chars:
            raise BadRequest(f"{where}: an id of {len(value)} characters, more than the limit of {self.max_id_chars}")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest(f"{where}: the id holds a lone surrogate (not a character UTF-8 can carry)") from None
        if field in self.index:
            return self.index[field].get(value, 0)
        # a field without a vocabulary holds ids written as decimal numbers: only the canonical ASCII form is an
        # id ("05", "５" or "²" would alias or break int()); anything else is an unknown id, as a vocabulary miss is
        if not _DECIMAL.fullmatch(value):
            return 0
        number = int(value)
        return number if number < self.sizes[field] else 0

    def parse(self, body: object) -> tuple[dict, list[str]]:
        """(example for ``relist.batch.collate``, the items' ids in input order)."""
        if not isinstance(body, dict):
            raise BadRequest(f"body: expected a JSON object, got {type(body).__name__}")
        unknown = sorted(set(body) - {"user", "items"})
        if unknown:
            raise BadRequest(f"body: unknown field(s) {unknown}; valid: ['items', 'user']")
        items = body.get("items")
        if not isinstance(items, list):
            raise BadRequest("items: expected a list of candidate items")
        if not items:
            raise BadRequest("items: the list is empty; send at least one candidate")
        if len(items) > self.max_items:
            raise BadRequest(f"items: {len(items)} candidates, more than the limit of {self.max_items}", 413)
        sparse = np.zeros((len(items), len(self.item_sparse)), dtype=np.int64)
        dense = np.zeros((len(items), len(self.dense)), dtype=np.float32)
        ids = []
        for k, item in enumerate(items):
            where = f"items[{k}]"
            if not isinstance(item, dict):
                raise BadRequest(f"{where}: expected an object with 'id' and 'features'")
            extra = sorted(set(item) - {"id", "features"})
            if extra:
                raise BadRequest(f"{where}: unknown field(s) {extra}; valid: ['features', 'id']")
            sparse[k, 0] = self._id(self.item_sparse[0], item.get("id"), f"{where}.id")
            ids.append(item["id"])
            features = item.get("features", {})
            if not isinstance(features, dict):
                raise BadRequest(f"{where}.features: expected an object of feature name to value")
            for name, value in features.items():
                if name in self.dense:
                    if isinstance(value, bool) or not isinstance(value, (int, float)):
                        raise BadRequest(f"{where}.features.{name}: expected a number, got {type(value).__name__}")
                    try:
                        number = float(value)
                    except OverflowError:
                        raise BadRequest(f"{where}.features.{name}: the number is outside the float32 range") from None
                    if not math.isfinite(number):
                        raise BadRequest(f"{where}.features.{name}: {value} is not finite")
                    if abs(number) > FLOAT32_MAX:
                        raise BadRequest(f"{where}.features.{name}: {number:g} is outside the float32 range")
                    dense[k, self.dense.index(name)] = number
                elif name in self.item_sparse[1:]:
                    sparse[k, self.item_sparse.index(name)] = self._id(name, value, f"{where}.features.{name}")
                else:
                    raise BadRequest(
                        f"{where}.features: unknown feature {name!r}; valid: "
                        f"{sorted(self.dense + self.item_sparse[1:])}"
                    )
            missing = [n for n in self.dense if n not in features]
            if missing:
                raise BadRequest(f"{where}.features: missing dense feature(s) {missing}")
        if len(set(ids)) != len(ids):
            raise BadRequest("items: the same id appears twice")
        user = body.get("user", {})
        if not isinstance(user, dict):
            raise BadRequest("user: expected an object")
        extra = sorted(set(user) - {"id", "features", "history"})
        if extra:
            raise BadRequest(f"user: unknown field(s) {extra}; valid: ['features', 'history', 'id']")
        user_sparse = np.zeros(len(self.user_sparse), dtype=np.int64)
        if "id" in user and self.user_sparse:
            user_sparse[0] = self._id(self.user_sparse[0], user["id"], "user.id")
        user_features = user.get("features", {})
        if not isinstance(user_features, dict):
            raise BadRequest("user.features: expected an object of feature name to id")
        for name, value in user_features.items():
            if name not in self.user_sparse[1:]:
                raise BadRequest(f"user.features: unknown feature {name!r}; valid: {sorted(self.user_sparse[1:])}")
            user_sparse[self.user_sparse.index(name)] = self._id(name, value, f"user.features.{name}")
        history = user.get("history", [])
        if not isinstance(history, list):
            raise BadRequest("user.history: expected a list of past clicked items")
        if len(history) > self.max_history:
            raise BadRequest(f"user.history: {len(history)} items, more than the limit of {self.max_history}", 413)
        hist = np.zeros((len(history), len(self.hist)), dtype=np.int64)
        for k, entry in enumerate(history):
            if not isinstance(entry, dict):
                raise BadRequest(f"user.history[{k}]: expected an object of field name to id")
            for name, value in entry.items():
                if name not in self.hist:
                    raise BadRequest(f"user.history[{k}]: unknown field {name!r}; valid: {sorted(self.hist)}")
                hist[k, self.hist.index(name)] = self._id(name, value, f"user.history[{k}].{name}")
        hist = hist[hist[:, 0] > 0] if len(self.hist) else hist  # unknown clicked items carry nothing
        return {"item_sparse": sparse, "item_dense": dense, "user_sparse": user_sparse, "user_hist": hist}, ids


def raw_vocabularies(data: PreparedDataset) -> dict[str, list[str]]:
    """Every sparse field's raw ids by index, as clients send them; a field kept as integers (no vocabulary
    file) as decimal strings."""
    fields = (*data.schema.item_sparse, *data.schema.user_sparse, *data.schema.user_hist)
    vocabs = {}
    for field in fields:
        if field.name not in vocabs:
            try:
                vocabs[field.name] = data.vocab(field.name)
            except KeyError:
                vocabs[field.name] = [str(k) for k in range(field.vocab)]
    return vocabs


def request_for_list(data: PreparedDataset, index: int, vocabs: dict[str, list[str]] | None = None) -> dict:
    """List ``index`` of a prepared dataset as the body a client sends to /rerank (what ``RequestParser``
    reads back): raw ids and named features, the user's clicked history, the items in the initial order.
    ``vocabs`` (``raw_vocabularies(data)``) saves reading the vocabularies on every call."""
    vocabs = raw_vocabularies(data) if vocabs is None else vocabs
    start, end = int(data.offsets[index]), int(data.offsets[index + 1])
    sparse = [f.name for f in data.schema.item_sparse]
    items = [
        {
            "id": vocabs[sparse[0]][int(data.item_sparse[r, 0])],
            "features": {
                **{n: vocabs[n][int(data.item_sparse[r, j])] for j, n in enumerate(sparse) if j},
                **{n: float(data.item_dense[r, j]) for j, n in enumerate(data.schema.item_dense)},
            },
        }
        for r in range(start, end)
    ]
    fields = [f.name for f in data.schema.user_sparse]
    user = {"id": vocabs[fields[0]][int(data.user_sparse[index, 0])]}
    if len(fields) > 1:
        user["features"] = {n: vocabs[n][int(data.user_sparse[index, j])] for j, n in enumerate(fields) if j}
    if data.schema.user_hist:
        hist = data.schema.user_hist
        h0, h1 = int(data.hist_offsets[index]), int(data.hist_offsets[index + 1])
        user["history"] = [
            {f.name: vocabs[f.name][int(data.user_hist[r, j])] for j, f in enumerate(hist)} for r in range(h0, h1)
        ]
    return {"user": user, "items": items}
