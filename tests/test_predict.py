"""`geofeat predict` explains itself: why it fell back, votes as vote shares, unreachable URLs."""

from __future__ import annotations

import functools
import http.server
import json
import socket
import threading

import pytest
from typer.testing import CliRunner

from flows.cli import app
from helpers import image_bytes, write
from models.segmenter import Segment
from storage.catalog import connect
from tasks.predict import Predictor
from tasks.specs import CropSpec, SegmenterSpec

runner = CliRunner()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A local HTTP server over a folder with one photo (nothing leaves 127.0.0.1)."""
    folder = tmp_path_factory.mktemp("www")
    write(folder / "street.jpg", image_bytes("JPEG", size=(160, 96), seed=5))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends


def predict(root, *args) -> tuple[int, str]:
    """`geofeat predict` with the demo's tiny random-init experts (which must be asked for)."""
    res = runner.invoke(app, ["predict", "--allow-untrained", *args], env={"GEOFEAT_HOME": root.url})
    return res.exit_code, res.stdout


def test_a_new_photo_falls_back_and_says_the_annotations_segmenter_cannot_see_it(trained_demo, tmp_path):
    root, _ = trained_demo
    photo = write(tmp_path / "new.jpg", image_bytes("JPEG", size=(160, 96), seed=9))
    code, out = predict(root, str(photo), "--json", "--method", "majority")
    assert code == 0, out
    (r,) = json.loads(out)
    assert r["fallback"] is True
    assert "`annotations` segmenter" in r["fallback_reason"] and "cannot see a new image" in r["fallback_reason"]
    top = r["top_k"][0]  # one whole-image vote: share 1 of 1, and its real probability beside it
    assert (top["votes"], top["vote_share"]) == (1, 1.0) and 0 < top["mean_probability"] < 1
    assert all(t["votes"] == 0 and t["vote_share"] == 0.0 for t in r["top_k"][1:])
    code, text = predict(root, str(photo), "--method", "majority")
    assert "whole-image fallback: the experts' segmenter" in text and "1 of 1 vote(s) (share 1.000)" in text


def test_majority_reports_votes_and_their_share(trained_demo):
    root, _ = trained_demo
    image = connect(root).sql("SELECT source_uri FROM images WHERE split = 'test' AND dataset = 'demo' "
                              "ORDER BY 1 LIMIT 1").fetchall()[0][0]
    code, out = predict(root, image, "--json", "--method", "majority", "--top-k", "3")
    assert code == 0, out
    (r,) = json.loads(out)
    n = len(r["crops"])
    assert r["fallback"] is False and r["fallback_reason"] is None and n > 0
    assert sum(t["votes"] for t in r["top_k"]) <= n
    for t in r["top_k"]:
        assert t["vote_share"] == round(t["votes"] / n, 4)
    tops = [c["top_country"] for c in r["crops"]]
    assert r["top_k"][0]["votes"] == max(tops.count(c) for c in set(tops))
    code, out = predict(root, image, "--json")  # logprob: a probability
    assert 0 < json.loads(out)[0]["top_k"][0]["probability"] <= 1


def test_inputs_that_cannot_be_read_say_why(trained_demo, served, tmp_path):
    root, _ = trained_demo
    unreachable = f"http://127.0.0.1:{closed_port()}/street.jpg"
    cases = {
        str(tmp_path / "missing.jpg"): "no_such_file",
        str(tmp_path): "is_a_folder",
        f"{served}/nothing-here.jpg": "url_not_found",
        unreachable: "url_unreachable",
    }
    code, out = predict(root, *cases, f"{served}/street.jpg", "--json")
    assert code == 1  # some inputs failed
    results = {r["image"]: r for r in json.loads(out)}
    for uri, reason in cases.items():
        assert results[uri]["error"].startswith(reason + ":"), results[uri]
    assert "could not fetch the URL" in results[unreachable]["error"]
    assert "no such file" not in results[unreachable]["error"]
    fetched = results[f"{served}/street.jpg"]
    assert "error" not in fetched and fetched["fallback"] and fetched["top_k"]


def _explainer(segmenter, spec: SegmenterSpec) -> Predictor:
    p = object.__new__(Predictor)  # only what _why_no_crops reads
    p.segmenter, p.seg_spec, p.crop_spec = segmenter, spec, CropSpec(min_area=400)
    p.segmenter_id, p.models = "UNTRAINED-tiny-random-demo@main-1", {"ground": None, "vehicle": None, "image": None}
    return p


def test_each_reason_for_no_crops_is_said():
    class Untrained:
        untrained = True

    p = _explainer(Untrained(), SegmenterSpec(kind="tiny-random", score_threshold=0.3))
    assert p._why_no_crops([]) == ("the segmenter `UNTRAINED-tiny-random-demo@main-1` (an UNTRAINED random-init "
                                   "model) found no segments in this image (score_threshold 0.3)")
    small = Segment(label="car", label_id=1, score=0.9, bbox=(0, 0, 5, 5), area=25, mask=None)
    why = p._why_no_crops([small])
    assert "found 1 segment(s) (car)" in why and "ground, vehicle" in why and "min_area 400 px" in why
    assert "annotated datasets (demo)" in _explainer(object(), SegmenterSpec(
        kind="annotations", annotations={"demo": {"panoptic_json": "a", "png_dir": "b", "images_root": "c"}}
    ))._why_no_crops(None)
