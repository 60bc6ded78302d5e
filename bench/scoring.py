"""Scoring benchmark: our scoring server against raw onnxruntime and azureml-inference-server-http.

Same machine, same run, same ONNX model for every row. Load comes from ``wrk`` in a separate
process over loopback keep-alive connections, POSTing the model's sample as JSON, at concurrency 1
and 16 for ``--duration`` seconds per point.

- (a) ``session.run`` in-process, one thread: the floor (no HTTP, no JSON);
- (b) ``python -m modules.scoring``: no-code mode (the server runs model.onnx itself) and
  entry-script mode (``bench/entry_scripts/onnx_score.py``);
- (c) azureml-inference-server-http with the same entry script: its defaults (1 sync gunicorn
  worker) and ``--worker_count`` = CPUs; installed in ``.work/bench-venv-azureml``.

Models: ``digits`` (scikit-learn's 8x8 digits, 64 inputs, MLP 64-64-10) and ``digits28`` (the
same digits upsampled to 28x28, 784 inputs, MLP 784-128-10), built from bundled data.

Then a probe: health-check latency while one long (sleeping) request is in flight.

    python3 -m bench.scoring [--quick] [--duration S] [--models digits,digits28] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench._load import LoadError, run_wrk, wrk_version
from bench._probe import health_while_busy
from bench._raw import measure_session
from bench._servers import (
    ROOT,
    ServerError,
    ServerSpec,
    azureml,
    azureml_version,
    ensure_azureml_venv,
    http_post,
    ours,
    running,
)

WORK = ROOT / ".work" / "bench"
RESULTS = ROOT / "bench" / "results"
SCRIPTS = Path(__file__).resolve().parent / "entry_scripts"
CONCURRENCY = (1, 16)


@dataclass(frozen=True)
class ModelChoice:
    """A benchmark model and how to build it."""

    image_size: int
    describe: str


MODELS = {
    "digits": ModelChoice(8, "64 float inputs (8x8 digits), MLP 64-64-10"),
    "digits28": ModelChoice(28, "784 float inputs (digits upsampled to 28x28), MLP 784-128-10"),
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
        from modules.examples.digits import build_digits_onnx

        log(f"building model {name} into {folder.relative_to(ROOT)} (scikit-learn, once)")
        build_digits_onnx(folder, image_size=MODELS[name].image_size, name=name)
    return folder


def server_specs(model_dir: Path, with_azureml: bool) -> list[ServerSpec]:
    """Every server configuration measured for one model."""
    script = SCRIPTS / "onnx_score.py"
    specs = [
        ours("ours-nocode", "(b) ours, no-code ONNX", model_dir),
        ours("ours-entry", "(b) ours, entry script", model_dir, script),
    ]
    if with_azureml:
        n = cpus()
        specs += [
            azureml("azureml-default", "(c) azureml, default (1 worker)", model_dir, script),
            azureml(f"azureml-{n}w", f"(c) azureml, {n} workers (= CPUs)", model_dir, script, workers=n),
        ]
    return specs


def _label_of(body: bytes) -> Any:
    doc = json.loads(body)
    doc = doc.get("outputs", doc) if isinstance(doc, dict) else doc
    return doc["label"][0]


def measure_server(
    spec: ServerSpec, body: bytes, expected_label: int, args: argparse.Namespace, log_dir: Path
) -> dict[str, Any]:
    """Start one server, check it answers the sample correctly, load it at each concurrency."""
    out: dict[str, Any] = {"label": spec.label, "points": {}, "error": None}
    try:
        with running(spec, log_dir) as server:
            status, reply = http_post(server.url("/score"), body, timeout_s=30)
            if status != 200 or _label_of(reply) != expected_label:
                raise ServerError(
                    f"sample answered {status}: {reply[:300]!r} (expected label {expected_label})"
                )
            run_wrk(
                server.url("/score"), body, concurrency=16, duration_s=args.warmup, threads=args.wrk_threads
            )
            rss = uss = 0.0
            for c in CONCURRENCY:
                log(f"  {spec.label}: c={c} for {args.duration:.0f}s")
                point = run_wrk(
                    server.url("/score"),
                    body,
                    concurrency=c,
                    duration_s=args.duration,
                    threads=args.wrk_threads,
                )
                out["points"][str(c)] = point.as_dict()
                r, u = server.memory_mb()
                rss, uss = max(rss, r), max(uss, u)
            out["rss_mb"], out["uss_mb"] = round(rss, 1), round(uss, 1)
    except (ServerError, LoadError, OSError, ValueError, KeyError) as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
        log(f"  {spec.label}: FAILED: {out['error']}")
    return out


def evaluate_targets(raw: dict[str, Any], servers: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, each with the figures it compares and whether it is met."""

    def point(key: str, c: int) -> dict[str, Any] | None:
        s = servers.get(key)
        return None if s is None or s["error"] else s["points"].get(str(c))

    azure_default = next((k for k in servers if k == "azureml-default"), None)
    azure_workers = next((k for k in servers if k.startswith("azureml-") and k.endswith("w")), None)
    rows = []
    for ours_key in ("ours-nocode", "ours-entry"):
        mine16, mine1 = point(ours_key, 16), point(ours_key, 1)
        for other, factor in ((azure_default, 3.0), (azure_workers, 1.5)):
            theirs = point(other, 16) if other else None
            rows.append(
                {
                    "target": f"c16 {ours_key} req/s >= {factor}x {other or 'azureml'}",
                    "measured": mine16["rps"] if mine16 else None,
                    "required": round(factor * theirs["rps"], 1) if theirs else None,
                    "met": (mine16["rps"] >= factor * theirs["rps"]) if mine16 and theirs else None,
                }
            )
        rows.append(
            {
                "target": f"c1 {ours_key} p50 <= session.run p50 + 0.3 ms",
                "measured": mine1["p50_ms"] if mine1 else None,
                "required": round(raw["p50_ms"] + 0.3, 3),
                "met": (mine1["p50_ms"] <= raw["p50_ms"] + 0.3) if mine1 else None,
            }
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
    head = (
        f"{'':34} | {'c=1':^31} | {'c=16':^31} | {'memory MiB':^15}\n"
        f"{'server':34} | {'p50 ms':>7} {'p99 ms':>7} {'req/s':>8} {'err':>5}"
        f" | {'p50 ms':>7} {'p99 ms':>7} {'req/s':>8} {'err':>5} | {'RSS':>7} {'USS':>7}"
    )
    lines = [
        f"== {name}: {result['describe']}; {duration_s:.0f} s per point, wrk over loopback ==",
        head,
        "-" * len(head.splitlines()[1]),
    ]
    raw = result["raw"]
    lines.append(
        f"{'(a) session.run in-process, 1 thr':34} | {_fmt(raw['p50_ms'], 3):>7} {_fmt(raw['p99_ms'], 3):>7}"
        f" {_fmt(raw['calls_per_s'], 0):>8} {'-':>5} | {'':31} | {'':>7} {'':>7}"
    )
    for s in result["servers"].values():
        if s["error"]:
            lines.append(f"{s['label']:34} | FAILED: {s['error'][:120]}")
            continue
        cells = []
        for c in CONCURRENCY:
            p = s["points"][str(c)]
            errors = p["http_errors"] + p["socket_errors"]
            cells.append(f"{_fmt(p['p50_ms']):>7} {_fmt(p['p99_ms']):>7} {_fmt(p['rps'], 0):>8} {errors:>5}")
        lines.append(
            f"{s['label']:34} | {cells[0]} | {cells[1]} | {_fmt(s['rss_mb'], 0):>7} {_fmt(s['uss_mb'], 0):>7}"
        )
    lines.append("targets:")
    for t in result["targets"]:
        verdict = {True: "MET", False: "NOT MET", None: "n/a"}[t["met"]]
        figures = f"measured {_fmt(t['measured']):>9}  needed {_fmt(t['required']):>9}"
        lines.append(f"  {t['target']:60} {figures}  {verdict}")
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
    p.add_argument("--models", default="digits,digits28", help="comma-separated: " + ", ".join(MODELS))
    p.add_argument("--skip-azureml", action="store_true", help="leave out azureml-inference-server-http")
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
    env["azureml_inference_server_http"] = None if azureml_skip else azureml_version()
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
        },
        "models": {},
    }
    for name in models:
        folder = prepare_model(name, args.rebuild)
        body = json.dumps(json.loads((folder / "sample.json").read_text()), separators=(",", ":")).encode()
        expected = json.loads((folder / "expected.json").read_text())["label"]
        rows = json.loads(body)["data"]
        log(f"{name}: (a) session.run in-process for {min(args.duration, 5.0):.0f}s")
        raw = measure_session(folder / "model.onnx", rows, min(args.duration, 5.0)).as_dict()
        servers = {
            spec.key: measure_server(spec, body, expected, args, log_dir)
            for spec in server_specs(folder, with_azureml=not azureml_skip)
        }
        report["models"][name] = {
            "describe": MODELS[name].describe,
            "model_bytes": (folder / "model.onnx").stat().st_size,
            "request_bytes": len(body),
            "raw": raw,
            "servers": servers,
            "targets": evaluate_targets(raw, servers),
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
            f"{env['azureml_inference_server_http'] or 'skipped'}\n"
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
