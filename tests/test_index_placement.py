"""Shard actors ask for the custom resource that only the index worker group declares, so on
Kubernetes they run where the shard volume is mounted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clipsearch.settings import IndexSettings
from tests.test_k8s_manifests import OVERLAYS, _one, _render, _settings


def test_default_asks_for_no_custom_resource() -> None:
    assert IndexSettings().actor_resources == {}


@pytest.mark.parametrize("name", OVERLAYS)
def test_every_shard_resource_is_declared_by_the_index_group_only(
    name: str, tmp_path: Path
) -> None:
    objects = _render(f"overlays/{name}")
    wanted = _settings(objects, tmp_path).index.actor_resources
    assert wanted, f"{name}: shard actors would land on any node, volume or not"
    groups = {
        g["groupName"]: json.loads(json.loads(g["rayStartParams"].get("resources", '"{}"')))
        for g in _one(objects, "RayCluster")["spec"]["workerGroupSpecs"]
    }
    for resource, amount in wanted.items():
        holders = [g for g, declared in groups.items() if resource in declared]
        assert holders == ["index"], f"{resource} declared by {holders}"
        shards = _settings(objects, tmp_path).index.shards
        assert groups["index"][resource] >= amount * shards  # all shards fit on one pod
