"""Scoring benchmark: our server against the model's limit, azureml-inference-server-http and MLServer.

Same machine, same run, same ONNX model for every row. Load comes from ``wrk`` in a separate
process over loopback keep-alive connections at concurrency 1, 16 and 64, ``--duration`` seconds
per point.

- (a) the limit: ``session.run`` in-process (no HTTP, no JSON), the best over onnxruntime thread
  settings and batch sizes, and the best batch-1 latency (``bench/_raw.py``);
- (b) ``python -m modules.scoring``: no-code mode (the server runs model.onnx itself, batching
  requests) with its defaults (one worker process per CPU) and with ``SCORING_WORKERS=1``, and
  entry-script mode (``bench/entry_scripts/onnx_score.py``);
- (c) azureml-inference-server-http with the same entry script: its defaults (1 sync gunicorn
  worker) and ``--worker_count`` = CPUs; installed in ``.work/bench-venv-azureml``;
- (d) MLServer with a minimal onnxruntime runtime (``bench/mlserver_runtime/``), its defaults;
  installed in ``.work/bench-venv-mlserver``. It speaks the Open Inference Protocol only, so its
  requests carry the same sample as OIP JSON.
- the floor: a bare aiohttp handler per process (``bench/_servers.py`` ``floor_main``: orjson,
  numpy, ``session.run`` on one thread, nothing else), one process per CPU: what HTTP, JSON and
  inference alone cost in Python here, and so the most any Python server can reach.

Models, built from bundled data: ``digits`` (MLP 64-64-10), ``digits28`` (MLP 784-128-10) and
``convnet`` (three conv blocks on 28x28 digits, ``session.run`` ≥ 200 µs at batch 1).

Health checks (``GET /``) are timed every 50 ms during each load point (the table shows c=16).
Then a probe: health-check latency while one long (sleeping) request is in flight.

    python3 -m bench.scoring [--quick] [--duration S] [--models digits,convnet] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench._load import LoadError, run_wrk, wrk_version
from bench._probe import HealthSampler, health_while_busy
from bench._raw import measure_limit
from bench._servers import (
    AZUREML_VENV,
    MLSERVER_VENV,
    ROOT,
    ServerError,
    ServerSpec,
    azureml,
    ensure_azureml_venv,
    ensure_mlserver_venv,
    floor,
    http_post,
    mlserver,
    ours,
    package_version,
    running,
)

WORK = ROOT / ".work" / "bench"
RESULTS = ROOT / "bench" / "results"
SCRIPTS = Path(__file__).resolve().parent / "entry_scripts"
CONCURRENCY = (1, 16, 64)


@dataclass(frozen=True)
class ModelChoice:
    """A benchmark model and how to build it."""

    build: Callable[[Path, str], Path]
    describe: str


def _digits(size: int) -> Callable[[Path, str], Path]:
    def build(folder: Path, name: str) -> Path:
        from modules.examples.digits import build_digits_onnx

        return build_digits_onnx(folder, image_size=size, name=name)

    return build


def _convnet(folder: Path, name: str) -> Path:
    from modules.examples.convnet import build_convnet_onnx

    return build_convnet_onnx(folder, name=name)


MODELS = {
    "digits": ModelChoice(_digits(8), "64 float inputs (8x8 digits), MLP 64-64-10"),
    "digits28": ModelChoice(_digits(28), "784 float inputs (digits upsampled to 28x28), MLP 784-128-10"),
    "convnet": ModelChoice(_convnet, "1x28x28 image, conv 32/96/128 channels + softmax: inference-bound"),
}


def log(msg: str) -> None:
    """A progress line on stderr."""
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def cpus() -> int:
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def prepare_model(name: str, rebuild: bool) -> Path:
    """Build the model folder under .work/bench/models once (``--rebuild`` forces it)."""
    folder = WORK / "models" / name
    if rebuild or not all((folder / f).is_file() for f in ("model.onnx", "sample.json", "expected.json")):
        log(f"building model {name} into {folder.relative_to(ROOT)} (scikit-learn, once)")
        MODELS[name].build(folder, name)
    return folder


def server_specs(model_dir: Path, with_azureml: bool, with_mlserver: bool) -> list[ServerSpec]:
    """Every server configuration measured for one model."""
    script = SCRIPTS / "onnx_score.py"
    n = cpus()
    specs = [
        ours("ours-nocode", f"(b) ours, no-code ONNX ({n} workers)", model_dir),
        ours("ours-nocode-1", "(b) ours, no-code ONNX, 1 worker", model_dir, workers=1),
        ours("ours-entry", "(b) ours, entry script", model_dir, script),
        floor("floor", f"floor: aiohttp+session.run ({n} procs)", model_dir, processes=n),
    ]
    if with_azureml:
        specs += [
            azureml("azureml-default", "(c) azureml, default (1 worker)", model_dir, script),
            azureml("azureml-workers", f"(c) azureml, {n} workers (= CPUs)", model_dir, script, workers=n),
        ]
    if with_mlserver:
        specs.append(
            mlserver("mlserver", "(d) MLServer, onnxruntime runtime", model_dir, model_dir.name, WORK)
        )
    return specs


def request_body(spec: ServerSpec, sample: dict[str, Any]) -> bytes:
    """The sample as this server takes it: ``{"data": ...}``, or OIP JSON for ``oip_model`` servers."""
    if spec.oip_model is None:
        return json.dumps(sample, separators=(",", ":")).encode()
    import numpy as np

    data = np.asarray(sample["data"], dtype=np.float32)
    tensor = {"name": "input", "shape": list(data.shape), "datatype": "FP32", "data": data.ravel().tolist()}
    return json.dumps({"inputs": [tensor]}, separators=(",", ":")).encode()


def _label_of(body: bytes) -> Any:
    doc = json.loads(body)
    doc = doc.get("outputs", doc) if isinstance(doc, dict) else doc
    if isinstance(doc, list):  # Open Inference Protocol outputs
        return next(o["data"][0] for o in doc if o["name"] == "label")
    return doc["label"][0]


def measure_server(
    spec: ServerSpec, sample: dict[str, Any], expected_label: int, args: argparse.Namespace, log_dir: Path
) -> dict[str, Any]:
    """Start one server, check it answers the sample correctly, load it at each concurrency."""
    out: dict[str, Any] = {"label": spec.label, "points": {}, "error": None}
    body = request_body(spec, sample)
    out["request_bytes"] = len(body)
    try:
        with running(spec, log_dir) as server:
            status, reply = http_post(server.url(spec.score_path), body, timeout_s=30)
            if status != 200 or _label_of(reply) != expected_label:
                raise ServerError(
                    f"sample answered {status}: {reply[:300]!r} (expected label {expected_label})"
                )
            run_wrk(
                server.url(spec.score_path),
                body,
                concurrency=16,
                duration_s=args.warmup,
                threads=args.wrk_threads,
            )
            rss = uss = 0.0
            for c in CONCURRENCY:
                log(f"  {spec.label}: c={c} for {args.duration:.0f}s")
                with HealthSampler(server) as health:
                    point = run_wrk(
                        server.url(spec.score_path),
                        body,
                        concurrency=c,
                        duration_s=args.duration,
                        threads=args.wrk_threads,
                    )
                out["points"][str(c)] = {**point.as_dict(), "health": health.summary()}
                r, u = server.memory_mb()
                rss, uss = max(rss, r), max(uss, u)
            out["rss_mb"], out["uss_mb"] = round(rss, 1), round(uss, 1)
    except (ServerError, LoadError, OSError, ValueError, KeyError) as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
        log(f"  {spec.label}: FAILED: {out['error']}")
    return out


def evaluate_targets(
    name: str, limit: dict[str, Any], servers: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    """The issue's targets for this model, each with the figures it compares and whether it is met."""

    def rps(key: str, c: int) -> float | None:
        s = servers.get(key)
        point = None if s is None or s["error"] else s["points"].get(str(c))
        return point["rps"] if point else None

    def row(
        target: str, measured: float | None, required: float | None, higher: bool = True
    ) -> dict[str, Any]:
        met = None
        if measured is not None and required is not None:
            met = measured >= required if higher else measured <= required
        return {"target": target, "measured": measured, "required": required, "met": met}

    def times(factor: float, other: str) -> float | None:
        theirs = rps(other, 16)
        return round(factor * theirs, 1) if theirs is not None else None

    ours16 = rps("ours-nocode", 16)
    rows = []
    if name == "convnet":
        rows.append(
            row("c16 ours req/s >= 60% of (a) rows/s", ours16, round(0.6 * limit["best"]["rows_per_s"], 1))
        )
        rows.append(row("c16 ours req/s >= 4x azureml default", ours16, times(4.0, "azureml-default")))
    else:
        rows.append(row("c16 ours req/s >= 5x azureml default", ours16, times(5.0, "azureml-default")))
        rows.append(row("c16 ours req/s >= 4x MLServer", ours16, times(4.0, "mlserver")))
    if name == "convnet":
        rows.append(
            row(
                "(ref) c16 floor req/s >= 60% of (a) rows/s",
                rps("floor", 16),
                round(0.6 * limit["best"]["rows_per_s"], 1),
            )
        )
    mine = servers.get("ours-nocode")
    p50 = None if mine is None or mine["error"] else mine["points"]["1"]["p50_ms"]
    rows.append(
        row(
            "c1 ours p50 ms <= (a) batch-1 p50 + 0.25",
            p50,
            round(limit["batch1"]["p50_ms"] + 0.25, 3),
            higher=False,
        )
    )
    return rows


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def render_model(name: str, result: dict[str, Any], duration_s: float) -> str:
    """The side-by-side table and targets for one model."""
    point_head = f"{'p50 ms':>7} {'p99 ms':>7} {'req/s':>7} {'err':>4}"
    head = (
        f"{'':38} | " + " | ".join(f"{f'c={c}':^28}" for c in CONCURRENCY) + f" | {'memory MiB':^11}"
        f" | {'GET / at c=16':^13}\n"
        f"{'server':38} | " + " | ".join(point_head for _ in CONCURRENCY) + f" | {'RSS':>5} {'USS':>5}"
        f" | {'p50':>6} {'max':>6}"
    )
    lines = [
        f"== {name}: {result['describe']}; request {result['request_bytes']} bytes; "
        f"{duration_s:.0f} s per point, wrk over loopback ==",
        head,
        "-" * len(head.splitlines()[1]),
    ]
    limit = result["limit"]
    best, fastest = limit["best"], limit["batch1"]
    lines.append(
        f"{'(a) limit: session.run in-process':38} | best {_fmt(best['rows_per_s'], 0)} rows/s "
        f"({best['setting']}, batch {best['batch']}); batch-1 p50 {_fmt(fastest['p50_ms'], 3)} ms "
        f"({fastest['setting']})"
    )
    for s in result["servers"].values():
        if s["error"]:
            lines.append(f"{s['label']:38} | FAILED: {s['error'][:120]}")
            continue
        cells = []
        for c in CONCURRENCY:
            p = s["points"][str(c)]
            errors = p["http_errors"] + p["socket_errors"]
            cells.append(f"{_fmt(p['p50_ms']):>7} {_fmt(p['p99_ms']):>7} {_fmt(p['rps'], 0):>7} {errors:>4}")
        memory = f"{_fmt(s['rss_mb'], 0):>5} {_fmt(s['uss_mb'], 0):>5}"
        health = s["points"]["16"]["health"]
        probes = f"{_fmt(health['median_ms']):>6} {_fmt(health['max_ms']):>6}"
        lines.append(f"{s['label']:38} | " + " | ".join(cells) + f" | {memory} | {probes}")
    lines.append("targets:")
    for t in result["targets"]:
        verdict = {True: "MET", False: "NOT MET", None: "n/a"}[t["met"]]
        figures = f"measured {_fmt(t['measured']):>9}  needed {_fmt(t['required']):>9}"
        lines.append(f"  {t['target']:46} {figures}  {verdict}")
    return "\n".join(lines)


def render_probe(probe: dict[str, Any]) -> str:
    """The health-while-busy lines."""
    lines = [f"== health check (GET /) while one {probe['busy_s']:.1f} s request is in flight =="]
    for p in probe["servers"].values():
        if p.get("error"):
            lines.append(f"  {p['label']:34} FAILED: {p['error'][:120]}")
            continue
        median, worst = _fmt(p["health_median_ms"]), _fmt(p["health_max_ms"])
        lines.append(
            f"  {p['label']:34} median {median:>8} ms  max {worst:>8} ms  ({p['probes']} probes, "
            f"{p['health_failures']} failed; the long request took {p['busy_request_s']} s)"
        )
    return "\n".join(lines)


def run_probe(busy_s: float, with_azureml: bool, log_dir: Path) -> dict[str, Any]:
    """Health latency behind one long request, for our server and azureml's."""
    script = SCRIPTS / "slow_score.py"
    specs = [ours("probe-ours", "(b) ours, entry script", SCRIPTS, script)]
    if with_azureml:
        specs += [
            azureml("probe-azureml-default", "(c) azureml, default (1 worker)", SCRIPTS, script),
            azureml("probe-azureml-w", f"(c) azureml, {cpus()} workers", SCRIPTS, script, workers=cpus()),
        ]
    out: dict[str, Any] = {"busy_s": busy_s, "servers": {}}
    for spec in specs:
        log(f"probe: {spec.label}")
        try:
            with running(spec, log_dir) as server:
                out["servers"][spec.key] = {
                    "label": spec.label,
                    **health_while_busy(server, busy_s).as_dict(),
                }
        except (ServerError, OSError) as exc:
            out["servers"][spec.key] = {"label": spec.label, "error": f"{type(exc).__name__}: {exc}"}
    return out


def environment() -> dict[str, Any]:
    """What the figures were measured on."""
    import onnxruntime

    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": model,
        "cpus_allowed": cpus(),
        "cpus_total": os.cpu_count(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "kernel": platform.release(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "wrk": wrk_version(),
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python3 -m bench.scoring", description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=10.0, help="seconds per load point (default 10)")
    p.add_argument("--quick", action="store_true", help="smoke run: digits only, 2 s points, short probe")
    p.add_argument("--models", default="digits,convnet", help="comma-separated: " + ", ".join(MODELS))
    p.add_argument("--skip-azureml", action="store_true", help="leave out azureml-inference-server-http")
    p.add_argument("--skip-mlserver", action="store_true", help="leave out MLServer")
    p.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (default 1; 2 CPUs are shared)")
    p.add_argument("--probe-seconds", type=float, default=2.0, help="length of the long probe request")
    p.add_argument("--rebuild", action="store_true", help="rebuild the benchmark models")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 when every measurement ran (targets met or not), 1 otherwise."""
    args = _parser().parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.quick:
        args.duration = min(args.duration, 2.0)
        args.probe_seconds = min(args.probe_seconds, 1.0)
        if args.models == _parser().get_default("models"):
            models = ["digits"]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        print(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}", file=sys.stderr)
        return 2
    if args.duration < 1:
        print(f"--duration must be at least 1 second, got {args.duration}", file=sys.stderr)
        return 2
    args.warmup = 1.0 if args.quick else 2.0

    try:
        env = environment()
    except LoadError as exc:
        print(f"cannot benchmark: {exc}", file=sys.stderr)
        return 1
    azureml_skip = "--skip-azureml given" if args.skip_azureml else ensure_azureml_venv(log)
    if azureml_skip:
        log(f"azureml-inference-server-http rows SKIPPED: {azureml_skip}")
    env["azureml_inference_server_http"] = (
        None if azureml_skip else package_version(AZUREML_VENV, "azureml-inference-server-http")
    )
    mlserver_skip = "--skip-mlserver given" if args.skip_mlserver else ensure_mlserver_venv(log)
    if mlserver_skip:
        log(f"MLServer rows SKIPPED: {mlserver_skip}")
    env["mlserver"] = None if mlserver_skip else package_version(MLSERVER_VENV, "mlserver")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    log_dir = WORK / "logs" / stamp
    started = time.monotonic()

    report: dict[str, Any] = {
        "environment": env,
        "settings": {
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "concurrency": list(CONCURRENCY),
            "wrk_threads": args.wrk_threads,
            "azureml_skipped": azureml_skip,
            "mlserver_skipped": mlserver_skip,
        },
        "models": {},
    }
    for name in models:
        folder = prepare_model(name, args.rebuild)
        sample = json.loads((folder / "sample.json").read_text())
        expected = json.loads((folder / "expected.json").read_text())["label"]
        point_s = 0.3 if args.quick else 1.0
        log(f"{name}: (a) the limit: sweeping session.run settings ({point_s:g} s per point)")
        limit = measure_limit(folder / "model.onnx", sample["data"], cpus(), point_s)
        specs = server_specs(folder, with_azureml=not azureml_skip, with_mlserver=not mlserver_skip)
        servers = {spec.key: measure_server(spec, sample, expected, args, log_dir) for spec in specs}
        report["models"][name] = {
            "describe": MODELS[name].describe,
            "model_bytes": (folder / "model.onnx").stat().st_size,
            "request_bytes": len(request_body(specs[0], sample)),
            "limit": limit,
            "servers": servers,
            "targets": evaluate_targets(name, limit, servers),
        }
    report["probe"] = run_probe(args.probe_seconds, not azureml_skip, log_dir)
    env["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    env["wall_s"] = round(time.monotonic() - started, 1)

    RESULTS.mkdir(parents=True, exist_ok=True)
    saved = RESULTS / f"scoring-{stamp}.json"
    saved.write_text(json.dumps(report, indent=2) + "\n")
    log(f"results saved to {saved.relative_to(ROOT)}; server logs in {log_dir.relative_to(ROOT)}")

    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(
            f"machine: {env['cpu']}, {env['cpus_allowed']} CPUs allowed; load average "
            f"{env['loadavg_start']} at start, {env['loadavg_end']} at end; python {env['python']}, "
            f"onnxruntime {env['onnxruntime']}, {env['wrk']}, azureml-inference-server-http "
            f"{env['azureml_inference_server_http'] or 'skipped'}, MLServer {env['mlserver'] or 'skipped'}\n"
        )
        for name, result in report["models"].items():
            print(render_model(name, result, args.duration) + "\n")
        print(render_probe(report["probe"]))
    failed = [
        f"{m}/{k}" for m, r in report["models"].items() for k, s in r["servers"].items() if s["error"]
    ] + [k for k, p in report["probe"]["servers"].items() if p.get("error")]
    if failed:
        log(f"some measurements failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
