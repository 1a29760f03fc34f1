"""Custom Prefect events: the build flow announces new crops; deployment triggers in prefect.yaml
(`train-experts/<name>`) start retraining on them."""

from __future__ import annotations

import hashlib
import logging

from flows.params import RetrainSpec
from storage.layout import DataRoot

log = logging.getLogger(__name__)

FEATURES_ADDED = "geofeat.features.added"


def catalog_resource(root: DataRoot, deployment: str) -> dict[str, str]:
    return {"prefect.resource.id": f"geofeat.catalog.{hashlib.sha256(root.url.encode()).hexdigest()[:16]}",
            "prefect.resource.name": root.url, "geofeat.train-deployment": deployment}


def emit_features_added(root: DataRoot, new_features: int, datasets: list[str], segmenter: str | None,
                        retrain: RetrainSpec | None) -> dict | None:
    """Emit FEATURES_ADDED when a run added at least `retrain.min_new_features` crops (never on a no-op)."""
    if retrain is None or new_features < retrain.min_new_features:
        return None
    from prefect.events import emit_event

    payload = {"new_features": int(new_features), "datasets": datasets, "segmenter": segmenter, "home": root.url}
    event = emit_event(event=FEATURES_ADDED, resource=catalog_resource(root, retrain.deployment), payload=payload)
    log.info("emitted %s (%d new crops) for train-experts/%s", FEATURES_ADDED, new_features, retrain.deployment)
    return payload if event is not None else None
