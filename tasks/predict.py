"""`geofeat predict`: images (paths or URLs) -> segments -> crops -> experts -> top-k countries.

Uses the latest registered experts and the segmenter they were trained on (its specs are read
back from the segmentation commit records), so a prediction sees crops cut exactly as in training.
"""

from __future__ import annotations

import numpy as np
import polars as pl
from PIL import Image

from models.expert import Expert
from models.labels import GROUPS
from models.vote import image_scores, topk, with_fallback
from storage import sources
from storage.layout import DataRoot
from tasks.evaluate import select_experts
from tasks.segment import (BatchSegmenter, ImageRef, ShardImages, collate_images, cut_crop, label_groups,
                           load_segmenter, segmenter_specs, select_segments)
from tasks.specs import EvalSpec
from tasks.validate import BadInput, load_rgb

METHODS = ("logprob", "majority")


def _dataset_for(uri: str, spec) -> str:
    """An annotations segmenter knows images by dataset; other segmenters ignore it."""
    for name, ann in spec.annotations.items():
        root = sources.url_fs(ann.images_root)[1] if "://" in ann.images_root else ann.images_root
        if sources.url_fs(uri)[1].startswith(str(root).rstrip("/") + "/"):
            return name
    return "predict"


class Predictor:
    def __init__(self, root: DataRoot, device: str = "auto", experts_run: str | None = None):
        self.experts = select_experts(root, EvalSpec(experts_run=experts_run))
        self.segmenter_id = self.experts["segmenter"][0]
        self.seg_spec, self.crop_spec = segmenter_specs(root, self.segmenter_id)
        self.device = device
        self.segmenter = load_segmenter(self.seg_spec, device)
        self.groups = label_groups(self.seg_spec, self.segmenter)
        self.models = {r["group"]: Expert.from_pretrained(r["uri"], device=device)
                       for r in self.experts.iter_rows(named=True)}
        self.countries = sorted({c for m in self.models.values() for c in m.labels})
        self.untrained = bool(self.experts["untrained"].any())

    def crops(self, uri: str) -> tuple[list[dict], list[Image.Image]]:
        ref = ImageRef(image_id="-", dataset=_dataset_for(uri, self.seg_spec), split="test", country="-", source_uri=uri)
        item = ShardImages([ref], self.seg_spec, self.segmenter)[0]
        if "error" in item:
            raise BadInput(*item["error"])
        batch = collate_images([item])
        (segments,) = BatchSegmenter(self.segmenter, self.seg_spec, 1)(batch["good"], batch["pixels"])
        if isinstance(segments, Exception):
            raise BadInput("segmenter_error", f"{type(segments).__name__}: {segments}")
        image = item["image"].numpy()
        meta, images = [], []
        for seg, group, _rank in select_segments(segments or [], self.groups, self.crop_spec):
            if group in self.models:
                meta.append({"label": seg.label, "group": group, "bbox": list(seg.bbox), "score": float(seg.score)})
                images.append(cut_crop(image, seg, self.crop_spec))
        return meta, images

    def _probs(self, group: str, images: list[Image.Image]) -> np.ndarray:
        model = self.models[group]
        x, _ = model.transforms(train=False).batch_pixels(images)  # uint8, as evaluation's loader delivers it
        p = model.predict_proba(model.pixel_values(x)).numpy()
        out = np.zeros((len(images), len(self.countries)), dtype=np.float32)
        out[:, [self.countries.index(c) for c in model.labels]] = p
        return out

    def _stack(self, parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts) if parts else np.zeros((0, len(self.countries)), dtype=np.float32)

    def predict(self, uri: str, top_k: int = 5, method: str = "logprob") -> dict:
        if not sources.exists(uri):
            return {"image": uri, "error": "no such file"}
        try:
            meta, images = self.crops(uri)
        except (BadInput, FileNotFoundError, OSError) as exc:
            reason = exc.reason if isinstance(exc, BadInput) else type(exc).__name__
            return {"image": uri, "error": f"{reason}: {getattr(exc, 'detail', exc)}"}
        vote_groups = [g for g in GROUPS if g in self.models]
        rows = [k for k, m in enumerate(meta) if m["group"] in vote_groups]
        probs = self._stack([self._probs(meta[k]["group"], [images[k]]) for k in rows])
        scores = image_scores(probs, np.zeros(len(rows), dtype=np.int64), None, 1, method)
        fallback_scores = None
        if not rows and "image" in self.models:  # the same policy as evaluate: the whole-image expert
            whole = load_rgb(sources.read_bytes(uri))
            meta, images, rows = [{"label": "whole image", "group": "image", "bbox": [0, 0, *whole.size],
                                   "score": 1.0}], [whole], [0]
            probs = self._probs("image", [whole])
            fallback_scores = image_scores(probs, np.zeros(1, dtype=np.int64), None, 1, method)
        scores, fell_back = with_fallback(scores, fallback_scores)
        fallback = bool(fell_back[0])
        if not rows:
            return {"image": uri, "error": "no crops and no whole-image expert to fall back on"}
        idx, val = topk(scores, min(top_k, len(self.countries)))
        crops = []
        for p, k in zip(probs, rows):
            best = int(np.argmax(p))
            crops.append({**meta[k], "top_country": self.countries[best], "confidence": round(float(p[best]), 4)})
        return {"image": uri, "method": method, "segmenter": self.segmenter_id, "fallback": fallback,
                "untrained": self.untrained,
                "top_k": [{"country": self.countries[j], "probability": round(float(v), 4)}
                          for j, v in zip(idx[0], val[0]) if j >= 0],
                "crops": crops}


def predictions_text(results: list[dict]) -> str:
    lines = []
    for r in results:
        lines.append(f"{r['image']}")
        if "error" in r:
            lines.append(f"  error: {r['error']}")
            continue
        if r["untrained"]:
            lines.append("  (experts started from random init: demo models, not the method)")
        lines.append(f"  top-{len(r['top_k'])} ({r['method']} vote{', whole-image fallback' if r['fallback'] else ''}):")
        lines += [f"    {t['country']}  {t['probability']:.3f}" for t in r["top_k"]]
        table = pl.DataFrame(r["crops"]).select("label", "group", "top_country", "confidence")
        lines.append(f"  crops that voted ({len(r['crops'])}):")
        lines += ["    " + "  ".join(f"{v}" for v in row) for row in table.iter_rows()]
    return "\n".join(lines) + "\n"
