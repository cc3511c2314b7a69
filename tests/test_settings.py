"""Settings precedence: defaults < YAML < environment < explicit overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from clipsearch.settings import load_settings


def test_defaults_are_the_documented_embedded_setup() -> None:
    s = load_settings()
    assert (s.gateway.host, s.gateway.port) == ("127.0.0.1", 50051)
    assert s.index.shards == 2 and s.index.factory == "Flat" and s.encoder.model == "demo"
    assert s.encoder.max_ongoing_requests >= s.encoder.max_batch_size


def test_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("index:\n  shards: 3\n  factory: Flat\nencoder:\n  max_batch_size: 4\n")
    monkeypatch.setenv("CLIPSEARCH_INDEX__SHARDS", "5")
    s = load_settings(cfg, gateway={"port": 0})
    assert s.index.shards == 5  # environment beats the file
    assert s.encoder.max_batch_size == 4  # the file beats defaults
    assert s.gateway.port == 0  # overrides beat everything
    assert load_settings(cfg, index={"shards": 7}).index.shards == 7


def test_unknown_keys_are_rejected(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("index:\n  shardz: 3\n")
    with pytest.raises(ValidationError, match="shardz"):
        load_settings(cfg)


@pytest.mark.parametrize(
    ("gap", "ok"), [(0, True), (1, True), (3.0, True), (0.5, False), (65, False)]
)
def test_reducing_gap_is_off_or_a_factor_of_at_least_one(gap: float, ok: bool) -> None:
    if ok:
        assert load_settings(encoder={"reducing_gap": gap}).encoder.reducing_gap == gap
    else:
        with pytest.raises(ValidationError, match="reducing_gap"):
            load_settings(encoder={"reducing_gap": gap})
