"""The explorer's zoom latency: from the drag (a POST to /api/zoom) to every image of the sub-sweep
on disk and analysed, with flux-toy on the CPU (or any model and device).

    uv run python benchmarks/bench_explorer.py --out results/            # flux-toy, 4 x 4, CPU
    uv run python benchmarks/bench_explorer.py --device cuda --out results/
    uv run python benchmarks/bench_explorer.py --smoke --out /tmp/bench   # flux-tiny, seconds
    uv run python benchmarks/bench_explorer.py --screenshots docs/        # the README's pictures

What is measured: a parent sweep (`--n` x `--n`, the model's steps) is generated first, not timed.
Then `flux-ir explore` is started as a new process on its folder, as a user starts it; `startup`
is the time until its server answers. Each zoom is a POST to /api/zoom over a different `--n` x `--n`
sub-range, followed by polling /api/job every 50 ms until the job is done: `latency` is the wall
time from the request to the last image written and the zoomed sweep analysed (its Lipschitz
field, pixel embedder); `first image` is when the first of them appeared. The first zoom of the
process loads the model (`model load`, from the job's own timings); the later ones are the latency
a user sees while exploring. `plain run_sweep` is the same sweep through the library call in this
process (the model already loaded, no server, no analysis): the floor; `ratio` = later zoom /
plain. The load average of the machine is recorded: on a shared CPU the numbers move with it.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, parser, write_results

NOTE = __doc__.split("What is measured:")[1]
PROMPT = "a red circle on a blue background"
ENTRY = "import sys; from flux_ir.cli import entry; entry()"


def parse_args(argv=None):
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="flux-toy (flux-tiny with --smoke)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument(
        "--n", type=int, default=None, help="points per axis of a zoom (4; 2 with --smoke)"
    )
    p.add_argument(
        "--steps", type=int, default=None, help="denoising steps (the model's; 2 with --smoke)"
    )
    p.add_argument("--zooms", type=int, default=3, help="zooms timed after the first")
    p.add_argument("--batch_size", type=int, default=None, help="the explorer's batch size (n * n)")
    p.add_argument("--port", type=int, default=8777)
    p.add_argument("--screenshots", default=None, help="also take the README's screenshots here")
    p.add_argument(
        "--screenshots_only", action="store_true", help="take the screenshots, skip the timing"
    )
    p.add_argument(
        "--shot_steps", type=int, default=8, help="denoising steps of the screenshots' runs (8)"
    )
    p.add_argument(
        "--fisher_shot",
        default=None,
        help="a sweep with `flux-ir geometry` files: screenshot its Fisher overlay and geodesics "
        "into --screenshots (default docs) as explorer-fisher.png, skip the timing",
    )
    args = p.parse_args(argv)
    smoke = args.smoke
    args.model = args.model or ("flux-tiny" if smoke else "flux-toy")
    args.n = args.n or (2 if smoke else 4)
    args.steps = args.steps or (2 if smoke else None)
    args.size = 32 if smoke else None
    args.batch_size = args.batch_size or args.n * args.n
    return args


def sweep_config(spec, args, grid):
    from flux_ir.sweep import SweepConfig

    return SweepConfig.from_spec(
        spec,
        prompt=PROMPT,
        num_steps=args.steps,
        width=args.size,
        height=args.size,
        grid=grid,
    )


class Client:
    def __init__(self, port: int):
        self.port = port

    def call(self, method: str, path: str, body=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, None if body is None else json.dumps(body), headers)
        res = conn.getresponse()
        data = json.loads(res.read() or b"null")
        conn.close()
        if res.status >= 400:
            raise RuntimeError(f"{method} {path}: {res.status} {data}")
        return data


def wait_for_server(client: Client, proc: subprocess.Popen, timeout: float = 900) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"flux-ir explore exited with {proc.returncode}")
        try:
            client.call("GET", "/api/entries")
            return time.perf_counter() - t0
        except (OSError, RuntimeError):
            time.sleep(0.1)
    raise RuntimeError("the explorer did not answer in time")


def timed_zoom(client: Client, alpha, beta, n: int) -> dict:
    t0 = time.perf_counter()
    job = client.call(
        "POST",
        "/api/zoom",
        {"sweep": "sweep", "alpha": alpha, "beta": beta, "n_alpha": n, "n_beta": n},
    )
    first = None
    while True:
        state = client.call("GET", f"/api/job?id={job['job']}")
        if first is None and state["done"] > 0:
            first = time.perf_counter() - t0
        if state["state"] in ("done", "error"):
            break
        time.sleep(0.05)
    latency = time.perf_counter() - t0
    if state["state"] == "error":
        raise RuntimeError(f"zoom failed: {state['error']}")
    return {
        "alpha": alpha,
        "beta": beta,
        "latency_s": latency,
        "first_image_s": first if first is not None else latency,
        **{k: v for k, v in state["timings"].items()},
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from flux_ir.models import load_pipeline
    from flux_ir.sweep import GridSpec, run_sweep

    if args.fisher_shot:
        fisher_screenshot(Path(args.fisher_shot), Path(args.screenshots or "docs"))
        return
    pipe, spec = load_pipeline(args.model, device=args.device)
    if args.screenshots_only:
        take_screenshots(pipe, spec, args, Path(args.screenshots or "docs"))
        return
    work = Path(tempfile.mkdtemp(prefix="bench_explorer_"))
    n = args.n
    try:
        parent = sweep_config(spec, args, GridSpec(n_alpha=n, n_beta=n))
        t0 = time.perf_counter()
        run_sweep(pipe, parent, work / "sweep", batch_size=n * n, progress=False)
        parent_s = time.perf_counter() - t0

        script = Path(sys.executable).with_name("flux-ir")  # the console script, as a user runs it
        cmd = [str(script)] if script.is_file() else [sys.executable, "-c", ENTRY]
        cmd += ["explore", str(work)]
        cmd += ["--port", str(args.port), "--device", args.device]
        cmd += ["--batch_size", str(args.batch_size)]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        client = Client(args.port)
        try:
            startup_s = wait_for_server(client, proc)
            ranges = [
                ((0.25 + 0.05 * k, 0.75 + 0.05 * k), (0.0, 0.5 + 0.1 * k))
                for k in range(args.zooms + 1)
            ]
            zooms = [timed_zoom(client, list(a), list(b), n) for a, b in ranges]
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        later = [z["latency_s"] for z in zooms[1:]]

        plain = []
        for k in range(max(1, args.zooms)):
            cfg = sweep_config(
                spec,
                args,
                GridSpec(alpha=(0.3, 0.6 + 0.01 * k), beta=(0.1, 0.4), n_alpha=n, n_beta=n),
            )
            t0 = time.perf_counter()
            run_sweep(pipe, cfg, work / f"plain{k}", batch_size=args.batch_size, progress=False)
            plain.append(time.perf_counter() - t0)
        plain_s = statistics.median(plain)
        later_s = statistics.median(later) if later else float("nan")
        load = os.getloadavg() if hasattr(os, "getloadavg") else None
        steps = parent.sampling.num_steps
        rows = [
            {"case": "explorer start (process to first answer)", "seconds": startup_s},
            {"case": f"first {n}x{n} zoom (loads the model)", "seconds": zooms[0]["latency_s"],
             "first image s": zooms[0]["first_image_s"], "model load s": zooms[0].get("load_s")},
            {"case": f"later {n}x{n} zoom (median of {len(later)})", "seconds": later_s,
             "first image s": statistics.median(z["first_image_s"] for z in zooms[1:]) if later else None,
             "ratio": later_s / plain_s},
            {"case": f"plain run_sweep {n}x{n} (median of {len(plain)})", "seconds": plain_s, "ratio": 1.0},
        ]  # fmt: skip
        result = {
            "model": args.model,
            "device": None,
            "grid": [n, n],
            "steps": steps,
            "size": [parent.sampling.width, parent.sampling.height],
            "batch_size": args.batch_size,
            "parent_sweep_s": parent_s,
            "startup_s": startup_s,
            "zooms": zooms,
            "plain_run_sweep_s": plain,
            "load_average": load,
            "cpu_count": os.cpu_count(),
            "smoke": args.smoke,
            "rows": rows,
        }
        result.pop("device")
        note = NOTE + (
            f"\n{args.model} on {args.device}, {parent.sampling.width}x{parent.sampling.height}, "
            f"{steps} steps, batch {args.batch_size}; load average {load}, {os.cpu_count()} CPUs."
        )
        name = "explorer_smoke" if args.smoke else "explorer"
        table = write_results(
            args.out,
            name,
            result,
            rows,
            ["case", "seconds", "first image s", "model load s", "ratio"],
            note,
        )
        print(table)
        if args.screenshots:
            take_screenshots(pipe, spec, args, Path(args.screenshots))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def chromium():
    """A headless Chromium driver of the system's browser (Debian's packages)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1440,900",
              "--hide-scrollbars"):  # fmt: skip
        options.add_argument(a)
    return webdriver.Chrome(
        service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"), options=options
    )


def fisher_screenshot(sweep: Path, out: Path) -> None:
    """docs/explorer-fisher.png: `sweep`'s grid under its Fisher det g overlay, with the geodesics
    of its `analysis/fisher_*.npz` drawn (solid) beside their straight lines (dashed)."""
    import threading

    from selenium.webdriver.support.ui import WebDriverWait

    from flux_ir.explorer import Explorer, make_server

    sweep = sweep.resolve()
    if not any((sweep / "analysis").glob("fisher_*.npz")):
        raise SystemExit(f"{sweep} has no analysis/fisher_*.npz: run `flux-ir geometry {sweep}`")
    explorer = Explorer(sweep.parent)
    server = make_server(explorer, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    driver = chromium()
    try:
        driver.get(f"http://127.0.0.1:{server.server_port}/#sweep={sweep.name}")
        n = len(list((sweep / "images").glob("*.png")))
        wait = WebDriverWait(driver, 300)
        wait.until(
            lambda d: (
                d.execute_script(
                    "return [...document.querySelectorAll('#grid img.point')]"
                    ".filter(i => i.naturalWidth).length"
                )
                == n
            )
        )
        driver.execute_script(
            "const s = document.getElementById('overlay');"
            "s.value = [...s.options].find(o => o.value.endsWith('|fisher')).value;"
            "s.dispatchEvent(new Event('change'));"
            "const g = document.getElementById('geodesics');"
            "g.checked = true; g.dispatchEvent(new Event('change'));"
        )
        wait.until(
            lambda d: (
                d.execute_script("return document.querySelectorAll('#geodesic-layer path').length")
                > 0
            )
        )
        time.sleep(1)
        out.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(out / "explorer-fisher.png"))
    finally:
        driver.quit()
        server.shutdown()
        server.server_close()
        explorer.close()
    print(f"screenshot: {out / 'explorer-fisher.png'}")


def take_screenshots(pipe, spec, args, out: Path) -> None:
    """docs/explorer-sweep.png (a 6 x 6 sweep: Lipschitz overlay, hover, a path) and
    docs/explorer-capture.png (a capture run: lens viewer and metrics), with headless Chromium."""
    import argparse
    import threading

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.support.ui import WebDriverWait

    from flux_ir.analysis import PixelEmbedder, analyze_sweep
    from flux_ir.capture import CaptureOptions
    from flux_ir.explorer import Explorer, make_server
    from flux_ir.sweep import GridSpec, run_sweep
    from flux_ir.workflows import capture_to_dir
    from flux_ir.workflows.metrics_run import capture_metrics

    shots = argparse.Namespace(**{**vars(args), "steps": args.shot_steps})
    work = Path(tempfile.mkdtemp(prefix="explorer_shots_"))
    try:
        cfg = sweep_config(
            spec, shots, GridSpec(alpha=(-0.5, 1.5), beta=(-0.5, 1.5), n_alpha=6, n_beta=6)
        )
        run_sweep(pipe, cfg, work / "sweep", batch_size=12, phase_pool=4, progress=False)
        analyze_sweep(work / "sweep", PixelEmbedder())
        opts = CaptureOptions.from_spec(
            spec, seed=3, num_steps=shots.steps, width=args.size, height=args.size
        )
        run_dir = capture_to_dir(pipe, spec, opts, work / "runs")
        capture_metrics(run_dir)
        explorer = Explorer(work, device=args.device)
        explorer.models.put(pipe, spec.name)
        server = make_server(explorer, port=0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_port}/"
        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
        for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1440,900",
                  "--hide-scrollbars"):  # fmt: skip
            options.add_argument(a)
        driver = webdriver.Chrome(
            service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"),
            options=options,
        )
        wait = WebDriverWait(driver, 300)
        try:
            driver.get(url + "#sweep=sweep")
            wait.until(
                lambda d: (
                    d.execute_script(
                        "return [...document.querySelectorAll('#grid img.point')].filter(i => i.naturalWidth).length"
                    )
                    == 36
                )
            )
            cell = lambda i: driver.find_element("css selector", f'#grid .cell[data-index="{i}"]')  # noqa: E731
            ActionChains(driver).click(cell(6)).perform()
            ActionChains(driver).click(cell(33)).perform()
            ActionChains(driver).move_to_element(cell(21)).perform()
            time.sleep(1)
            out.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(out / "explorer-sweep.png"))
            run = run_dir.relative_to(work).as_posix()
            driver.get(url + f"#capture={run}")
            driver.execute_script("location.reload()")
            wait.until(
                lambda d: (
                    d.execute_script("return document.querySelectorAll('#metrics tbody tr').length")
                    > 0
                )
            )
            driver.execute_script(
                "for (const [id, v] of [['block', 6], ['cstep', 5]]) {"
                "  const e = document.getElementById(id); e.value = v; e.dispatchEvent(new Event('input')); }"
            )
            wait.until(
                lambda d: d.execute_script(
                    "const i = document.getElementById('lens-img'); return i.complete && i.naturalWidth > 0"
                )
            )
            time.sleep(1)
            driver.save_screenshot(str(out / "explorer-capture.png"))
        finally:
            driver.quit()
            server.shutdown()
            server.server_close()
            explorer.close()
        print(f"screenshots: {out / 'explorer-sweep.png'}, {out / 'explorer-capture.png'}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
