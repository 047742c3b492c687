"""The explorer's server without a browser: path safety, localhost binding, the JSON endpoints, and a
live zoom with flux-tiny through the HTTP API."""

import http.client
import inspect
import json
import threading
from pathlib import Path

import pytest

from flux_ir.explorer import Explorer, make_server
from flux_ir.explorer.safety import Forbidden, inside, media_type
from flux_ir.explorer.views import children_of, parent_of
from flux_ir.explorer.work import zoom_config, zoom_folder
from flux_ir.sweep import GridSpec, SweepConfig, run_sweep
from flux_ir.workflows import CaptureRunOptions, capture_to_dir

from .conftest import small_opts

SIZE = dict(width=32, height=32, num_steps=2)


# -- path safety --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "rel",
    [
        "..",
        "../x",
        "a/../../x",
        "a/..",
        "/etc/passwd",
        "a\\..\\b",
        ".hidden",
        "a/.tmp1.png",
        "a\x00",
    ],
)
def test_paths_outside_the_root_or_hidden_are_refused(tmp_path, rel):
    with pytest.raises(Forbidden):
        inside(tmp_path.resolve(), rel)


def test_symbolic_links_out_of_the_root_are_refused_and_inside_ones_followed(tmp_path):
    root = (tmp_path / "root").resolve()
    (root / "a").mkdir(parents=True)
    (tmp_path / "secret.txt").write_text("no")
    (root / "out").symlink_to(tmp_path)
    (root / "in").symlink_to(root / "a")
    with pytest.raises(Forbidden, match="outside"):
        inside(root, "out/secret.txt")
    assert inside(root, "in") == root / "a"
    assert inside(root, "") == root and inside(root, ".") == root
    assert inside(root, "a/b.png") == root / "a" / "b.png"


def test_only_data_files_are_served():
    assert media_type(Path("x.png")) == "image/png"
    assert media_type(Path("x.mp4")) == "video/mp4"
    for name in ("x.html", "x.js", "x.svg", "x.py", "x.pt", "x"):
        assert media_type(Path(name)) is None, name


def test_the_server_binds_localhost_by_default(tmp_path):
    from flux_ir.cli.explore import explore

    assert inspect.signature(explore).parameters["host"].default == "127.0.0.1"
    assert inspect.signature(make_server).parameters["host"].default == "127.0.0.1"
    explorer = Explorer(tmp_path)
    server = make_server(explorer, port=0)
    try:
        assert server.server_address[0] == "127.0.0.1" and server.server_port > 0
    finally:
        server.server_close()
        explorer.close()


# -- a served folder: a flux-tiny sweep and capture run ----------------------------------------
@pytest.fixture(scope="module")
def served(tiny, tmp_path_factory):
    pipe, spec = tiny
    root = tmp_path_factory.mktemp("served")
    cfg = SweepConfig.from_spec(spec, **SIZE, grid=GridSpec(n_alpha=2, n_beta=3))
    run_sweep(pipe, cfg, root / "sweep", batch_size=6, progress=False)
    run_dir = capture_to_dir(
        pipe, spec, small_opts(num_steps=2), root / "runs", CaptureRunOptions()
    )
    (root / "page.html").write_text("<script>alert(1)</script>")
    (root.parent / "secret.txt").write_text("outside")
    explorer = Explorer(root, device="cpu", batch_size=4)
    explorer.models.put(pipe, "flux-tiny")
    server = make_server(explorer, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield {"root": root, "port": server.server_port, "run": run_dir, "explorer": explorer}
    server.shutdown()
    server.server_close()
    explorer.close()


def request(served, method, path, body=None, headers=None):
    """(status, headers, body bytes) of a raw request: the path is sent exactly as written."""
    conn = http.client.HTTPConnection("127.0.0.1", served["port"], timeout=60)
    data = None if body is None else json.dumps(body).encode()
    hdrs = {"Content-Type": "application/json"} if body is not None else {}
    hdrs.update(headers or {})
    conn.request(method, path, body=data, headers=hdrs)
    res = conn.getresponse()
    out = res.status, dict(res.getheaders()), res.read()
    conn.close()
    return out


def get_json(served, path):
    status, _, body = request(served, "GET", path)
    return status, json.loads(body)


def test_entries_list_the_sweep_and_the_capture_run(served):
    status, data = get_json(served, "/api/entries")
    assert status == 200
    kinds = {e["path"]: e["kind"] for e in data["entries"]}
    run = served["run"].relative_to(served["root"]).as_posix()
    assert kinds == {"sweep": "sweep", run: "capture"}


def test_the_sweep_endpoint_gives_every_point_with_its_image(served):
    status, view = get_json(served, "/api/sweep?path=sweep")
    assert status == 200
    assert view["grid"]["n_alpha"] == 2 and view["grid"]["n_beta"] == 3
    assert [(p["row"], p["col"]) for p in view["points"]] == [
        (r, c) for r in range(2) for c in range(3)
    ]
    assert view["alphas"] == [0.0, 1.0] and view["betas"] == [0.0, 0.5, 1.0]
    assert all(p["done"] and p["norm_after"] > 0 for p in view["points"])
    status, headers, body = request(served, "GET", view["points"][5]["image"])
    assert status == 200 and headers["Content-Type"] == "image/png"
    assert body.startswith(b"\x89PNG") and headers["X-Content-Type-Options"] == "nosniff"


@pytest.mark.parametrize(
    "path",
    [
        "/files/../secret.txt",
        "/files/%2e%2e/secret.txt",
        "/files/sweep/../../secret.txt",
        "/files//etc/passwd",
        "/api/sweep?path=..",
        "/api/sweep?path=/etc",
        "/files/page.html",
    ],
)
def test_paths_outside_the_served_folder_and_pages_in_it_are_refused(served, path):
    status, _, body = request(served, "GET", path)
    assert status == 403, body
    assert b"outside" not in body or b"refused" in body


def test_the_page_and_its_script_come_from_the_package_under_a_strict_policy(served):
    status, headers, body = request(served, "GET", "/")
    assert status == 200 and b"/static/app.js" in body
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert request(served, "GET", "/static/app.js")[0] == 200
    assert request(served, "GET", "/static/../server.py")[0] == 404
    assert b"http" not in body.replace(b"http://www.w3.org/2000/svg", b"")  # nothing remote


def test_other_hosts_and_foreign_posts_are_refused(served):
    assert request(served, "GET", "/api/entries", headers={"Host": "evil.example:80"})[0] == 403
    conn = http.client.HTTPConnection("127.0.0.1", served["port"], timeout=30)
    conn.request("POST", "/api/zoom", body=b"sweep=sweep", headers={"Content-Type": "text/plain"})
    assert conn.getresponse().status == 415
    conn.close()
    status, _, _ = request(
        served, "POST", "/api/zoom", {"sweep": "sweep"}, {"Origin": "http://evil.example"}
    )
    assert status == 403


@pytest.mark.parametrize(
    "body, message",
    [
        ({"alpha": [1, 0], "beta": [0, 1], "n_alpha": 2, "n_beta": 2}, "alpha interval"),
        ({"alpha": [0, 1], "beta": [0, 1], "n_alpha": 0, "n_beta": 2}, "n_alpha must be"),
        ({"alpha": "x", "beta": [0, 1], "n_alpha": 2, "n_beta": 2}, "alpha must be two numbers"),
    ],
)
def test_a_bad_zoom_is_refused_with_the_reason(served, body, message):
    status, _, data = request(served, "POST", "/api/zoom", {"sweep": "sweep", **body})
    assert status == 400 and message in json.loads(data)["error"]


def test_unknown_jobs_and_pages_are_404(served):
    assert request(served, "GET", "/api/job?id=nope")[0] == 404
    assert request(served, "GET", "/api/nothing")[0] == 404


def test_a_zoom_generates_a_linked_sub_sweep_live_and_reopens_it(served):
    root = served["root"]
    zoom = {"sweep": "sweep", "alpha": [0.25, 0.5], "beta": [-0.5, 1.5], "n_alpha": 2, "n_beta": 2}
    status, _, body = request(served, "POST", "/api/zoom", zoom)
    assert status == 202
    job = json.loads(body)
    assert job["sweep"] == "sweep-zoom1"
    served["explorer"].jobs.jobs[job["job"]].wait(timeout=120)
    status, state = get_json(served, f"/api/job?id={job['job']}")
    assert state["state"] == "done", state
    assert state["done"] == state["total"] == 4

    child = root / "sweep-zoom1"
    meta = json.loads((child / "metadata.json").read_text())
    assert meta["sweep"]["grid"]["alpha"] == [0.25, 0.5]
    assert meta["sweep"]["grid"]["beta"] == [-0.5, 1.5]  # beyond [0, 1]
    parent = json.loads((root / "sweep" / "metadata.json").read_text())["sweep"]
    assert {k: v for k, v in meta["sweep"].items() if k != "grid"} == {
        k: v for k, v in parent.items() if k != "grid"
    }
    assert len(list((child / "images").glob("*.png"))) == 4 and meta["complete"]
    assert json.loads((child / "zoom.json").read_text())["parent"] == "../sweep"

    _, view = get_json(served, "/api/sweep?path=sweep-zoom1")
    assert view["parent"] == "sweep" and view["alphas"] == [0.25, 0.5]
    assert "lipschitz_pixel32" in view["overlays"]  # analysed once complete
    _, parent_view = get_json(served, "/api/sweep?path=sweep")
    assert [c["path"] for c in parent_view["children"]] == ["sweep-zoom1"]

    status, _, body = request(served, "POST", "/api/zoom", zoom)  # the same range: reopened
    assert status == 202 and json.loads(body)["sweep"] == "sweep-zoom1"
    served["explorer"].jobs.jobs[json.loads(body)["job"]].wait(timeout=120)
    assert len(list(root.glob("sweep-zoom*"))) == 1


def test_zoom_settings_and_folders(served):
    root = served["root"]
    cfg = zoom_config(root / "sweep", (0.1, 0.2), "0,2", 3, 2)
    assert cfg.grid.alpha == (0.1, 0.2) and cfg.grid.beta == (0.0, 2.0)
    assert (cfg.grid.n_alpha, cfg.grid.n_beta) == (3, 2) and cfg.seeds == (0, 123, 200)
    assert zoom_folder(root / "sweep", cfg.grid).name.startswith("sweep-zoom")
    assert zoom_folder(root / "sweep", cfg.grid) != root / "sweep-zoom1"  # another range
    assert parent_of(root.resolve(), root / "sweep") is None
    assert children_of(root.resolve(), root / "sweep-zoom1") == []


def test_the_capture_endpoints_give_blocks_lens_decodes_and_metrics(served):
    run = served["run"].relative_to(served["root"]).as_posix()
    status, view = get_json(served, f"/api/capture?path={run}")
    assert status == 200
    assert [b["name"] for b in view["blocks"]] == [
        "double 0", "double 1", "single 0", "single 1", "single 2", "single 3",
    ]  # fmt: skip
    assert view["steps"] == [0, 1] and view["decoded"]["x0"] == 12
    status, headers, body = request(
        served, "GET", f"/api/lens?path={run}&kind=single&index=3&step=1&target=x0"
    )
    assert status == 200 and headers["Content-Type"] == "image/jpeg" and body[:2] == b"\xff\xd8"
    # target next was not decoded: the explorer decodes it with the model, and keeps it
    status, _, body = request(
        served, "GET", f"/api/lens?path={run}&kind=double&index=0&step=0&target=next"
    )
    assert status == 200 and body[:2] == b"\xff\xd8"
    assert (
        served["run"] / "intermediates" / "decoded_next" / "double_block_0_step_0.jpg"
    ).is_file()
    assert request(served, "GET", f"/api/lens?path={run}&kind=single&index=9&step=0")[0] == 404

    status, metrics = get_json(served, f"/api/metrics?path={run}")
    assert status == 200 and len(metrics["rows"]) == 6 * 2 * 2
    last = [r for r in metrics["rows"] if r["name"] == "single 3"]
    assert all(r["cosine_to_last"] == pytest.approx(1.0, abs=1e-5) for r in last)
    assert (served["run"] / "intermediates" / "block_metrics.csv").is_file()


def test_a_zoomed_sweep_shows_at_once_with_its_points_pending(served, monkeypatch):
    explorer, gate = served["explorer"], threading.Event()
    real_get = explorer.models.get

    def slow_get(*args, **kwargs):  # the model is still loading
        gate.wait(60)
        return real_get(*args, **kwargs)

    monkeypatch.setattr(explorer.models, "get", slow_get)
    zoom = {"sweep": "sweep", "alpha": [0.0, 0.1], "beta": [0.0, 0.1], "n_alpha": 2, "n_beta": 2}
    status, _, body = request(served, "POST", "/api/zoom", zoom)
    job = json.loads(body)
    try:
        status, view = get_json(served, f"/api/sweep?path={job['sweep']}")
        assert status == 200 and view["parent"] == "sweep"
        assert view["done"] == 0 and not any(p["done"] for p in view["points"])
        assert view["job"]["state"] in ("queued", "loading model") and view["job"]["total"] == 4
    finally:
        gate.set()
    explorer.jobs.jobs[job["job"]].wait(timeout=120)
    assert get_json(served, f"/api/job?id={job['job']}")[1]["state"] == "done"
    assert request(served, "HEAD", "/api/entries")[0] == 405


def test_the_page_ships_in_the_package():
    from importlib import resources

    static = resources.files("flux_ir.explorer") / "static"
    names = {p.name for p in static.iterdir()}
    assert {"index.html", "app.js", "style.css"} <= names
    page = (static / "index.html").read_text()
    assert 'src="/static/app.js"' in page and 'href="/static/style.css"' in page
    script = (static / "app.js").read_text()
    assert "http://" not in script.replace('"http://www.w3.org/2000/svg"', "")
    assert "https://" not in script and "https://" not in page
