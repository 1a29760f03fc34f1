"""`geofeat predict`: images (paths or URLs) -> segments -> crops -> experts -> top-k countries.

Uses the latest registered experts and the segmenter they were trained on (its specs are read
back from the segmentation commit records), so a prediction sees crops cut exactly as in training.
It says why it answered as it did: a whole-image fallback names its reason (the segmenter found no
segments, none became a crop for the experts' groups, or the `annotations` segmenter has no masks
for a new image), a majority vote reports votes and their share, and an unreadable input says
whether the file is missing or the URL could not be fetched.
"""

from __future__ import annotations

import numpy as np
import polars as pl
from PIL import Image

from models.expert import Expert
from models.labels import GROUPS
from models.vote import image_scores, topk, vote_counts, with_fallback
from storage import sources
from storage.layout import DataRoot
from tasks.evaluate import select_experts
from tasks.segment import (BatchSegmenter, ImageRef, ShardImages, collate_images, cut_crop, label_groups,
                           load_segmenter, segmenter_specs, select_segments)
from tasks.specs import EvalSpec
from tasks.validate import BadInput, load_rgb

METHODS = ("logprob", "majority")


def _dataset_for(uri: str, spec) -> str | None:
    """An annotations segmenter knows images by dataset (None: not under any annotated folder)."""
    for name, ann in spec.annotations.items():
        root = sources.url_fs(ann.images_root)[1] if "://" in ann.images_root else ann.images_root
        if sources.url_fs(uri)[1].startswith(str(root).rstrip("/") + "/"):
            return name
    return None


class InputError(Exception):
    """An input predict cannot read: `reason` (a short code) and `detail` a user can act on."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def read_input(uri: str) -> bytes:
    """The bytes of a path or URL; failures raise InputError saying what went wrong."""
    try:
        remote = not sources.is_local(uri)
    except ValueError as exc:  # fsspec: protocol not known
        raise InputError("unknown_protocol", f"{exc}; give a local path or an http(s)://, s3://, gs:// URL") from exc
    try:
        return sources.read_bytes(uri)
    except FileNotFoundError as exc:
        if remote:
            raise InputError("url_not_found", "the server answered that there is nothing at this URL "
                           f"(HTTP 404 or no such object): {exc}") from exc
        raise InputError("no_such_file", "no such file at this path") from exc
    except IsADirectoryError as exc:
        raise InputError("is_a_folder", "a folder, not an image file") from exc
    except PermissionError as exc:
        raise InputError("unreadable_file", f"permission denied: {exc}") from exc
    except Exception as exc:  # network and object-store errors come in many types
        if remote:
            raise InputError("url_unreachable", f"could not fetch the URL ({type(exc).__name__}: {exc}); check the "
                           "address and the network (or download it and pass the file)") from exc
        raise InputError("unreadable_file", f"{type(exc).__name__}: {exc}") from exc


class Predictor:
    def __init__(self, root: DataRoot, device: str = "auto", experts_run: str | None = None,
                 selection: EvalSpec | None = None):
        self.experts = select_experts(root, selection or EvalSpec(experts_run=experts_run))
        self.segmenter_id = self.experts["segmenter"][0]
        self.seg_spec, self.crop_spec = segmenter_specs(root, self.segmenter_id)
        self.device = device
        self.segmenter = load_segmenter(self.seg_spec, device)
        self.groups = label_groups(self.seg_spec, self.segmenter)
        self.models = {r["group"]: Expert.from_pretrained(r["uri"], device=device)
                       for r in self.experts.iter_rows(named=True)}
        self.countries = sorted({c for m in self.models.values() for c in m.labels})
        self.untrained = bool(self.experts["untrained"].any())

    def crops(self, uri: str) -> tuple[list[dict], list[Image.Image], str | None]:
        """The image's crops for the experts' groups, and why there are none (None when there are)."""
        dataset = _dataset_for(uri, self.seg_spec)
        ref = ImageRef(image_id="-", dataset=dataset or "predict", split="test", country="-", source_uri=uri)
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
        return meta, images, None if meta else self._why_no_crops(segments)

    def _why_no_crops(self, segments) -> str:
        if segments is None:  # only the annotations segmenter answers "no masks for this image"
            known = ", ".join(sorted(self.seg_spec.annotations)) or "none"
            return (f"the experts' segmenter `{self.segmenter_id}` is the `annotations` segmenter: it only has "
                    f"ground-truth masks for the images of its annotated datasets ({known}) and cannot see a new "
                    "image. Train experts on a model segmenter (segmenter.kind: mask2former) to predict new photos")
        untrained = " (an UNTRAINED random-init model)" if getattr(self.segmenter, "untrained", False) else ""
        if not segments:
            return (f"the segmenter `{self.segmenter_id}`{untrained} found no segments in this image "
                    f"(score_threshold {self.seg_spec.score_threshold})")
        labels = sorted({s.label for s in segments})
        groups = sorted(g for g in self.models if g in GROUPS)
        return (f"the segmenter{untrained} found {len(segments)} segment(s) ({', '.join(labels[:8])}"
                f"{', ...' if len(labels) > 8 else ''}), but none became a crop for the experts' groups "
                f"({', '.join(groups)}) at min_score {self.crop_spec.min_score} and min_area {self.crop_spec.min_area} px")

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
        try:
            data = read_input(uri)
            meta, images, why = self.crops(uri)
        except (InputError, BadInput) as exc:
            return {"image": uri, "error": f"{exc.reason}: {exc.detail}"}
        except OSError as exc:
            return {"image": uri, "error": f"{type(exc).__name__}: {exc}"}
        vote_groups = [g for g in GROUPS if g in self.models]
        rows = [k for k, m in enumerate(meta) if m["group"] in vote_groups]
        probs = self._stack([self._probs(meta[k]["group"], [images[k]]) for k in rows])
        scores = image_scores(probs, np.zeros(len(rows), dtype=np.int64), None, 1, method)
        fallback_scores = None
        if not rows and "image" in self.models:  # the same policy as evaluate: the whole-image expert
            whole = load_rgb(data)
            meta, images, rows = [{"label": "whole image", "group": "image", "bbox": [0, 0, *whole.size],
                                   "score": 1.0}], [whole], [0]
            probs = self._probs("image", [whole])
            fallback_scores = image_scores(probs, np.zeros(1, dtype=np.int64), None, 1, method)
        scores, fell_back = with_fallback(scores, fallback_scores)
        fallback = bool(fell_back[0])
        if not rows:
            return {"image": uri, "error": f"no crops and no whole-image expert to fall back on: {why}"}
        idx, val = topk(scores, min(top_k, len(self.countries)))
        crops = []
        for p, k in zip(probs, rows):
            best = int(np.argmax(p))
            crops.append({**meta[k], "top_country": self.countries[best], "confidence": round(float(p[best]), 4)})
        if method == "majority":  # a vote share, not a probability: say how many votes it is
            votes, mean_p = vote_counts(probs), probs.mean(axis=0)
            ranked = [{"country": self.countries[j], "votes": int(votes[j]), "vote_share": round(votes[j] / len(probs), 4),
                       "mean_probability": round(float(mean_p[j]), 4)} for j in idx[0] if j >= 0]
        else:
            ranked = [{"country": self.countries[j], "probability": round(float(v), 4)}
                      for j, v in zip(idx[0], val[0]) if j >= 0]
        return {"image": uri, "method": method, "segmenter": self.segmenter_id, "fallback": fallback,
                "fallback_reason": why if fallback else None, "untrained": self.untrained,
                "top_k": ranked, "crops": crops}


def predictions_text(results: list[dict]) -> str:
    lines = []
    for r in results:
        lines.append(f"{r['image']}")
        if "error" in r:
            lines.append(f"  error: {r['error']}")
            continue
        if r["untrained"]:
            lines.append("  (experts started from random init: demo models, not the method)")
        if r["fallback"]:
            lines.append(f"  whole-image fallback: {r['fallback_reason']}")
        n = len(r["crops"])
        if r["method"] == "majority":
            lines.append(f"  top-{len(r['top_k'])} (majority vote: each of the {n} crop(s) votes for its top country):")
            lines += [f"    {t['country']}  {t['votes']} of {n} vote(s) (share {t['vote_share']:.3f}), mean probability "
                      f"{t['mean_probability']:.3f}" for t in r["top_k"]]
        else:
            lines.append(f"  top-{len(r['top_k'])} (logprob vote over {n} crop(s), probability):")
            lines += [f"    {t['country']}  {t['probability']:.3f}" for t in r["top_k"]]
        table = pl.DataFrame(r["crops"]).select("label", "group", "top_country", "confidence")
        lines.append(f"  crops that voted ({n}):")
        lines += ["    " + "  ".join(f"{v}" for v in row) for row in table.iter_rows()]
    return "\n".join(lines) + "\n"
