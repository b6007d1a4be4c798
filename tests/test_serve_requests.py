"""A prepared list written as a /rerank body reads back as the same arrays (the demo and the service tests
send their requests this way)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from relist.data.store import PreparedDataset
from relist.serve.requests import RequestParser, raw_vocabularies, request_for_list


@pytest.mark.parametrize("source", ["synthetic", "mind", "trivago"])
def test_a_list_written_as_a_request_parses_back_to_its_own_arrays(source, request):
    """Synthetic ids are integers sent as decimal strings; MIND's and trivago's are strings read through the
    vocabularies, with a clicked history (and on trivago user features: platform and device)."""
    if source == "synthetic":
        data = PreparedDataset(request.getfixturevalue("synthetic_world") / "data")
    else:
        data = request.getfixturevalue(f"{source}_data")
    vocabs = raw_vocabularies(data)
    parser = RequestParser(data.schema, vocabs, max_items=1000)
    checked_history = 0
    for index in data.split("test")[:30]:
        index = int(index)
        body = json.loads(json.dumps(request_for_list(data, index, vocabs)))  # through JSON, as sent
        example, ids = parser.parse(body)
        start, end = int(data.offsets[index]), int(data.offsets[index + 1])
        assert ids == [item["id"] for item in body["items"]] and len(ids) == end - start
        np.testing.assert_array_equal(example["item_sparse"], data.item_sparse[start:end])
        np.testing.assert_array_equal(example["item_dense"], data.item_dense[start:end])
        np.testing.assert_array_equal(example["user_sparse"], data.user_sparse[index])
        h0, h1 = int(data.hist_offsets[index]), int(data.hist_offsets[index + 1])
        history = data.user_hist[h0:h1]
        np.testing.assert_array_equal(example["user_hist"], history[history[:, 0] > 0])
        checked_history += len(example["user_hist"])
        assert set(body["user"].get("features", {})) == {f.name for f in data.schema.user_sparse[1:]}
    assert checked_history > 0  # the lists checked carry a history to compare
