#!/usr/bin/env python3
"""clickagg's benchmark harness: one command, figures in bench/RESULTS.md.

    python3 bench/bench.py                 # everything, 10M events, medians of 3
    python3 bench/bench.py --only cluster  # one group: floor, throughput, hotkey, cluster, peers,
                                           # serving, recovery, freshness
    python3 bench/bench.py --events 1000000 --runs 1   # a quick look
    python3 bench/bench.py --only serving --baseline OLD_BINARY   # latency of two builds, side by side

Data sets are generated once by `clickagg generate` and cached under --data (default
bench/.data, or $CLICKAGG_BENCH_DATA); a set is regenerated only when its parameters change.
Each figure is the median wall time of --runs runs, with the peak RSS of the process (the
largest process, for a cluster). Events/s counts every line of the logs, dead-lettered ones
included, because every line is read and parsed. The parse-only floor reads and parses every
line with no dataflow; `run`'s ratio to it, at the same number of threads, is the overhead that
is ours to close. The floor and the 1×1 and 1×2 runs, which the targets compare with each other,
and the peers (DuckDB in two forms, chDB: bench/duckdb_job.py, bench/chdb_job.py) are measured
in interleaved rounds (one run of each per round), so that their ratios come from the same
minutes of the same machine.

Nothing here asserts: the harness reports and people judge. Timed tests lie on a busy machine.
"""

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The harness copies the binary it built here, so that a rebuild during a long run cannot change it.
BINARY = ROOT / "target" / "release" / "clickagg"
GROUPS = ["floor", "throughput", "hotkey", "cluster", "peers", "kafka", "serving", "lengths", "recovery", "freshness"]
# The peers' rows, in the order they are reported, with the job that makes each.
PEERS = {
    "DuckDB 2 threads, DISTINCT ON": ["duckdb_job.py", "--dedup", "distinct-on"],
    "DuckDB 2 threads, exact tie-break": ["duckdb_job.py", "--dedup", "exact"],
    "chDB 2 threads, LIMIT 1 BY": ["chdb_job.py"],
}
# Run only when asked for (`--only soak`): it takes minutes and times nothing.
OPTIONAL_GROUPS = ["soak"]


def log(message):
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def steal_seconds():
    """Core-seconds the hypervisor has run something else on this VM's cores since boot (the
    steal column of /proc/stat); None where the kernel does not say."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def measure(commands):
    """Starts every command at once and waits for all; returns (seconds, peak RSS in bytes of the
    largest process, CPU seconds of all, user and system, core-seconds stolen by the hypervisor
    meanwhile or None). Several commands are the processes of one cluster."""
    stolen_before = steal_seconds()
    started = time.monotonic()
    processes = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for c in commands]
    peak = 0
    cpu = 0.0
    failures = []
    for command, process in zip(commands, processes):
        _, status, usage = os.wait4(process.pid, 0)
        peak = max(peak, usage.ru_maxrss * 1024)
        cpu += usage.ru_utime + usage.ru_stime
        if status != 0:
            failures.append(f"{' '.join(map(str, command))}: status {status}: {process.stderr.read().decode()[-2000:]}")
        process.returncode = status
    seconds = time.monotonic() - started
    if failures:
        raise SystemExit("a benchmarked command failed:\n" + "\n".join(failures))
    stolen_after = steal_seconds()
    stolen = None if stolen_before is None or stolen_after is None else stolen_after - stolen_before
    return seconds, peak, cpu, stolen


def repeat(name, commands, runs):
    return interleaved([(name, commands)], runs)[0]


def interleaved(configs, runs):
    """Runs each `(name, commands)` of `configs` once per round, for `runs` rounds, and summarises
    each. Figures that are compared with each other (a run against the parse floor, one worker
    against two) then come from the same minutes: this VM's speed drifts by about 10% over
    minutes, and runs of one configuration after another would carry the drift into the ratios."""
    samples = {name: [] for name, _ in configs}
    for i in range(runs):
        for name, commands in configs:
            seconds, rss, cpu, stolen = measure(commands() if callable(commands) else commands)
            log(f"{name}: run {i + 1}/{runs}: {seconds:.2f} s, {cpu:.2f} CPU-s, {rss / 2**30:.2f} GiB"
                + (f", {stolen:.2f} core-s stolen" if stolen else ""))
            samples[name].append((seconds, rss, cpu, stolen))
    summaries = []
    for name, _ in configs:
        times = sorted(s[0] for s in samples[name])
        summary = {"name": name, "median": statistics.median(times), "min": times[0], "max": times[-1],
                   "cpu": statistics.median(s[2] for s in samples[name]),
                   "rss": max(s[1] for s in samples[name]), "runs": runs}
        stolen = [s[3] for s in samples[name] if s[3] is not None]
        if stolen:
            summary["stolen"] = max(stolen)
        summaries.append(summary)
    return summaries


def dataset(data_dir, name, events, preset):
    """Generates a data set once; returns (path, lines)."""
    path = data_dir / name
    marker = path / ".bench.json"
    wanted = {"events": events, "preset": preset, "partitions": 8, "seed": 1}
    if marker.exists() and json.loads(marker.read_text()).get("params") == wanted:
        return path, json.loads(marker.read_text())["lines"]
    log(f"generating {name} ({events} events, preset {preset}) under {path}")
    subprocess.run([BINARY, "generate", "--out", path, "--events", str(events), "--preset", preset,
                    "--partitions", "8", "--seed", "1"], check=True)
    lines = 0
    for part in path.glob("part-*.csv"):
        with open(part, "rb") as f:
            lines += sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b"")) - 1
    marker.write_text(json.dumps({"params": wanted, "lines": lines}))
    return path, lines


def free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def cluster_commands(logs, out, processes, workers, scratch):
    def build():
        hostfile = scratch / "hostfile"
        hostfile.write_text("".join(f"127.0.0.1:{p}\n" for p in free_ports(processes)))
        commands = []
        for process in range(processes):
            command = [BINARY, "run", "--logs", logs, "-w", str(workers), "-n", str(processes),
                       "-p", str(process), "--hostfile", hostfile]
            if process == 0:
                command += ["--out", out]
            commands.append(command)
        return commands
    return build


def ensure_wrk():
    """wrk, Debian's HTTP load generator, installed when missing (as root or with sudo)."""
    if shutil.which("wrk"):
        return "wrk"
    log("installing Debian's wrk")
    prefix = [] if os.geteuid() == 0 else ["sudo", "-n"]
    subprocess.run(prefix + ["apt-get", "install", "-y", "-qq", "wrk"], check=True, stdout=subprocess.DEVNULL)
    return "wrk"


def wrk_latency(url, seconds, connections):
    """Runs wrk against url; returns (p50 ms, p99 ms, requests/s, non-2xx)."""
    out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", url],
                         capture_output=True, text=True, check=True).stdout
    def ms(label):
        for line in out.splitlines():
            parts = line.split()
            if parts and parts[0] == label:
                value = parts[1]
                for suffix, scale in (("us", 1e-3), ("ms", 1.0), ("s", 1e3)):
                    if value.endswith(suffix):
                        return float(value[: -len(suffix)]) * scale
        raise SystemExit(f"wrk printed no {label} line:\n{out}")
    rps = next(float(l.split()[1]) for l in out.splitlines() if l.startswith("Requests/sec"))
    errors = sum(int(l.split()[-1]) for l in out.splitlines() if "Non-2xx" in l)
    return ms("50%"), ms("99%"), rps, errors


def start_served(logs, scratch, until, binary=None):
    """Starts `run -w 2 --serve` (of `binary`, default the build measured) on a free port and
    reads its stderr up to a line containing `until`; returns (process, port, seconds taken)."""
    port = free_ports(1)[0]
    started = time.monotonic()
    process = subprocess.Popen([binary or BINARY, "run", "--logs", logs, "--out", scratch / "served", "-w", "2",
                                "--serve", f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for line in process.stderr:
        if until in line:
            return process, port, time.monotonic() - started
    raise SystemExit(f"clickagg run --serve ended before saying {until!r}")


def stop(process):
    process.kill()
    process.wait()
    process.stderr.close()


def replay_is_complete(port):
    import urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/status", timeout=10) as response:
        return json.load(response).get("complete") is True


def serving_latency(logs, scratch, runs, seconds=8, connections=200, baseline=None):
    """p50/p99 of two endpoints at `connections` concurrent clients while a 2-worker replay
    with --serve is ingesting; medians over runs. With a `baseline` binary, each round measures
    it too, right before this build, so that both see the same minutes of this VM; returns
    (this build's figures, the baseline's or None)."""
    ensure_wrk()
    builds = {"this build": BINARY} | ({"baseline": baseline} if baseline else {})
    samples = {build: {"popular_ads": [], "aggregated_count": []} for build in builds}
    for run in range(runs):
        for build, binary in reversed(builds.items()):
            process, port, _ = start_served(logs, scratch, "serving on", binary)
            time.sleep(2)  # let the replay get going, so that every request is served while ingesting
            base = f"http://127.0.0.1:{port}"
            urls = {"popular_ads": base + "/v1/ads/popular_ads?window=5m&count=100",
                    "aggregated_count": base + "/v1/ads/2654435761/aggregated_count"}
            for name, url in urls.items():
                p50, p99, rps, errors = wrk_latency(url, seconds, connections)
                log(f"serving {name} ({build}): run {run + 1}/{runs}: p50 {p50:.2f} ms, p99 {p99:.2f} ms, "
                    f"{rps:.0f} req/s, {errors} non-2xx")
                samples[build][name].append((p50, p99, rps, errors))
            if replay_is_complete(port):
                log("warning: the replay ended before the load did: not every request was served while ingesting")
            stop(process)
    def summary(by_endpoint):
        return {name: {"p50": statistics.median(s[0] for s in v), "p99": statistics.median(s[1] for s in v),
                       "rps": statistics.median(s[2] for s in v), "errors": sum(s[3] for s in v), "runs": runs,
                       "p99_runs": [s[1] for s in v]}
                for name, v in by_endpoint.items()}
    return summary(samples["this build"]), (summary(samples["baseline"]) if baseline else None)


def serving_replay(logs, scratch, runs):
    """A 2-worker replay with --serve, timed up to its "replay complete" (the process then goes
    on serving, and is stopped), and the plain 2-worker replay of the same logs, one of each per
    round (interleaved, so that the ratio compares the same minutes of a machine whose speed
    drifts): what serving costs ingest. Peak RSS of the served one is read from /proc before
    stopping it."""
    served, plain = [], []
    for i in range(runs):
        seconds, rss, _, _ = measure([[BINARY, "run", "--logs", logs, "--out", scratch / "plain", "-w", "2"]])
        log(f"run -w 2: run {i + 1}/{runs}: {seconds:.2f} s, {rss / 2**30:.2f} GiB")
        plain.append((seconds, rss))
        process, _, seconds = start_served(logs, scratch, "replay complete")
        status = Path(f"/proc/{process.pid}/status").read_text()
        rss = int(next(l for l in status.splitlines() if l.startswith("VmHWM")).split()[1]) * 1024
        stop(process)
        log(f"run -w 2 --serve: run {i + 1}/{runs}: {seconds:.2f} s to replay complete, {rss / 2**30:.2f} GiB "
            f"({seconds / plain[-1][0]:.2f}× the plain run's time, {rss / plain[-1][1]:.2f}× its RSS)")
        served.append((seconds, rss))

    def summary(name, samples):
        times = sorted(t for t, _ in samples)
        return {"name": name, "median": statistics.median(times), "min": times[0], "max": times[-1],
                "rss": max(r for _, r in samples), "runs": runs}
    serve = summary("run, 1×2 with --serve (to replay complete)", served)
    beside = summary("run, 1×2 (in the --serve rounds)", plain)
    serve["time_ratio"] = statistics.median(s[0] / p[0] for s, p in zip(served, plain))
    serve["rss_ratio"] = statistics.median(s[1] / p[1] for s, p in zip(served, plain))
    return serve, beside


def generated(data_dir, name, events, minutes, partitions=4):
    """A generated set of `events` over `minutes` of event time under `data_dir`, made once."""
    path = data_dir / name
    marker = path / ".bench.json"
    wanted = {"events": events, "minutes": minutes, "partitions": partitions}
    if not (marker.exists() and json.loads(marker.read_text()) == wanted):
        log(f"generating {name} ({events} events over {minutes} minutes)")
        shutil.rmtree(path, ignore_errors=True)
        subprocess.run([BINARY, "generate", "--out", path, "--events", str(events), "--minutes", str(minutes),
                        "--partitions", str(partitions), "--seed", "1"], check=True)
        marker.write_text(json.dumps(wanted))
    return path


def serving_lengths(data_dir, scratch, runs, rate_per_minute=33_334, short_minutes=60):
    """Peak RSS of a `--serve` replay (2 workers, to its "replay complete") of two logs at the
    same rate, `short_minutes` and four times as long (issue 25: memory bounded by retention,
    not by the log's length); the two lengths alternate in each round. Returns the rows."""
    sets = [(minutes, generated(data_dir, f"lengths-{minutes}m", rate_per_minute * minutes, minutes))
            for minutes in (short_minutes, 4 * short_minutes)]
    samples = {minutes: [] for minutes, _ in sets}
    for i in range(runs):
        for minutes, logs in sets:
            process, _, seconds = start_served(logs, scratch, "replay complete")
            status = Path(f"/proc/{process.pid}/status").read_text()
            rss = int(next(l for l in status.splitlines() if l.startswith("VmHWM")).split()[1]) * 1024
            stop(process)
            log(f"run -w 2 --serve, {minutes} min: run {i + 1}/{runs}: {seconds:.2f} s, peak {rss / 2**30:.2f} GiB")
            samples[minutes].append((seconds, rss))
    rows = []
    for minutes, _ in sets:
        times = sorted(t for t, _ in samples[minutes])
        rows.append({"name": f"run, 1×2 with --serve, {minutes} min at {rate_per_minute:,} events/min",
                     "median": statistics.median(times), "min": times[0], "max": times[-1],
                     "rss": statistics.median(r for _, r in samples[minutes]), "runs": runs,
                     "events": rate_per_minute * minutes, "minutes": minutes})
    rows[1]["rss_ratio_to_short"] = rows[1]["rss"] / rows[0]["rss"]
    return rows


def rss_of(pid):
    """Resident set size of a process now, in bytes (VmRSS of /proc/PID/status)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(l for l in status.splitlines() if l.startswith("VmRSS")).split()[1]) * 1024


def cpu_seconds_of(pid):
    """User and system CPU seconds a live process has used (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def served_watermark(port):
    """The follower's watermark (ms of event time) from /v1/status, or None before it has one."""
    import urllib.request
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/status", timeout=5) as response:
            return json.load(response).get("watermark")
    except (OSError, ValueError):
        return None


def soak(data_dir, scratch, results_dir, hours=6, time_scale=120, rate=10_000, every=3.0):
    """Serving for hours of event time (issue 25): `run --follow --store … --serve` while `feed`
    appends `hours` of event time at `time_scale` times the wall clock (`rate` clicks per wall
    second, so rate/time_scale per event second), sampling the follower's RSS every `every`
    seconds against the event time it has reached (the served watermark). Writes the samples as
    JSON and an RSS-against-event-time plot as a PNG beside the results; reports RSS at 2 h and
    at the end. Not a timed test: the ratio is what it is about."""
    logs, store = scratch / "soak-logs", scratch / "soak.db"
    shutil.rmtree(logs, ignore_errors=True)
    subprocess.run([BINARY, "feed", "--logs", logs, "--duration", "0s"], check=True, stderr=subprocess.DEVNULL)
    port = free_ports(1)[0]
    follower = subprocess.Popen(follow_command(logs, store, "--serve", f"127.0.0.1:{port}"),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = hours * 3600 / time_scale
    feeder = subprocess.Popen([BINARY, "feed", "--logs", logs, "--rate", str(rate), "--time-scale", str(time_scale),
                               "--duration", f"{int(wall) + 30}s"], stderr=subprocess.DEVNULL)
    began = time.monotonic()
    start = None
    samples = []
    try:
        while True:
            time.sleep(every)
            if follower.poll() is not None:
                raise SystemExit(f"soak: the follower exited with status {follower.returncode}")
            mark = served_watermark(port)
            if mark is None:
                continue
            start = start if start is not None else mark
            hours_in = (mark - start) / 3_600_000
            samples.append({"wall_s": round(time.monotonic() - began, 1), "event_hours": hours_in, "rss": rss_of(follower.pid)})
            if len(samples) % 20 == 0:
                log(f"soak: {hours_in:.2f} h of event time, RSS {samples[-1]['rss'] / 2**30:.2f} GiB")
            if hours_in >= hours or feeder.poll() is not None:
                break
        cpu_s = cpu_seconds_of(follower.pid)
    finally:
        feeder.kill()
        feeder.wait()
        follower.terminate()
        follower.wait()
        shutil.rmtree(logs, ignore_errors=True)

    def rss_at(h):
        return next((s["rss"] for s in samples if s["event_hours"] >= h), None)
    reached = samples[-1]["event_hours"] if samples else 0
    result = {"hours": hours, "reached_hours": reached, "time_scale": time_scale, "rate": rate,
              "wall_s": round(time.monotonic() - began), "cpu_s": cpu_s, "rss_2h": rss_at(2), "rss_end": samples[-1]["rss"] if samples else None,
              "peak": max((s["rss"] for s in samples), default=None), "samples": len(samples),
              "plot": "soak-rss.png"}
    if result["rss_2h"] and result["rss_end"]:
        result["ratio"] = result["rss_end"] / result["rss_2h"]
    (results_dir / "soak-samples.json").write_text(json.dumps(samples))
    plot = ("import json, sys\n"
            "import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\n"
            "samples = json.load(open(sys.argv[1]))\n"
            "fig, ax = plt.subplots(figsize=(8, 4.5))\n"
            "ax.plot([s['event_hours'] for s in samples], [s['rss'] / 2**20 for s in samples])\n"
            "ax.set_xlabel('event time fed (hours)'); ax.set_ylabel('follower RSS (MiB)')\n"
            "ax.set_ylim(bottom=0); ax.grid(True)\n"
            "ax.set_title(sys.argv[3])\n"
            "fig.tight_layout(); fig.savefig(sys.argv[2], dpi=100)\n")
    python = harness_python_with(data_dir, ("matplotlib",))
    title = f"run --follow --serve while feed writes {hours} h at {time_scale}x"
    subprocess.run([python, "-c", plot, results_dir / "soak-samples.json", results_dir / result["plot"], title], check=True)
    log(f"soak: {reached:.2f} h of event time in {result['wall_s']} s; RSS at 2 h "
        f"{(result['rss_2h'] or 0) / 2**30:.2f} GiB, at the end {(result['rss_end'] or 0) / 2**30:.2f} GiB"
        + (f" ({result['ratio']:.2f}×)" if "ratio" in result else ""))
    return result


def store_read(store):
    """(committed frontier, bytes of the logs read) of a store, or None before its first commit."""
    import sqlite3
    try:
        with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as db:
            frontier = db.execute("SELECT value FROM meta WHERE key = 'frontier'").fetchone()
            read = db.execute("SELECT coalesce(sum(offset), 0) FROM partitions").fetchone()[0]
        return (int(frontier[0]), read) if frontier else None
    except sqlite3.Error:
        return None


def follow_command(logs, store, *extra):
    return [BINARY, "run", "--logs", logs, "--store", store, "--follow", "-w", "2", *extra]


def recovery(data_dir, scratch, runs, rate_per_minute=20_000, short_minutes=90):
    """Recovery time after a crash for two log lengths at the same rate (issue 6): a follower
    commits all of the logs and is killed with SIGKILL; a new one is started and timed up to its
    "recovered" line (the state as of the committed watermark rebuilt). It replays from the
    checkpoints the retention needs (allowed lateness + the largest window), so the two lengths
    should take the same time."""
    results = []
    for minutes in (short_minutes, 4 * short_minutes):
        events = rate_per_minute * minutes
        name = f"recovery-{minutes}m"
        path = data_dir / name
        marker = path / ".bench.json"
        wanted = {"events": events, "minutes": minutes}
        if not (marker.exists() and json.loads(marker.read_text()) == wanted):
            log(f"generating {name} ({events} events over {minutes} minutes)")
            subprocess.run([BINARY, "generate", "--out", path, "--events", str(events), "--minutes", str(minutes),
                            "--partitions", "4", "--seed", "1"], check=True)
            marker.write_text(json.dumps(wanted))
        total = sum(p.stat().st_size for p in path.glob("part-*.csv"))
        store = scratch / f"{name}.db"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{store}{suffix}").unlink(missing_ok=True)
        command = follow_command(path, store, "--tick", "1m", "--idle-timeout", "1s")
        started = time.monotonic()
        first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while (store_read(store) or (0, 0))[1] < total:
            time.sleep(0.2)
        time.sleep(3)  # the partitions go idle and the watermark moves past the last rows
        first.kill()
        first.wait()
        log(f"{name}: first follower committed {total} bytes in {time.monotonic() - started:.1f} s, then SIGKILL")
        samples = []
        for i in range(runs):
            began = time.monotonic()
            process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            said = None
            for line in process.stderr:
                if "recovered:" in line:
                    said = line.strip()
                    break
            seconds = time.monotonic() - began
            process.kill()
            process.wait()
            if said is None:
                raise SystemExit(f"{name}: the restarted follower never said it recovered")
            log(f"{name}: restart {i + 1}/{runs}: recovered in {seconds:.2f} s ({said})")
            samples.append(seconds)
        results.append({"minutes": minutes, "events": events, "bytes": total, "median": statistics.median(samples),
                        "min": min(samples), "max": max(samples), "runs": runs})
    return results


def freshness(scratch, runs, rate=200_000, seconds=20, tick="250ms", delay_ms=5_000):
    """Append-to-commit latency (issue 6): `clickagg feed` appends `rate` clicks/s stamped with
    the wall clock to 4 partitions while `run --follow` commits; a click with ts t is committed by
    the first commit whose frontier is past t. Reported: that commit's time minus t minus the
    watermark delay, sampled every 10 ms of the feed (less its first 3 s of warm-up)."""
    import bisect
    import sqlite3
    samples = []
    for run in range(runs):
        logs, store = scratch / f"fresh-{run}", scratch / f"fresh-{run}.db"
        # The groups before leave hundreds of MB to write back; a commit's fsync would wait for them.
        os.sync()
        subprocess.run([BINARY, "feed", "--logs", logs, "--duration", "0s"], check=True, stderr=subprocess.DEVNULL)
        follower = subprocess.Popen(follow_command(logs, store, "--tick", tick), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        began = int(time.time() * 1000)
        subprocess.run([BINARY, "feed", "--logs", logs, "--rate", str(rate), "--duration", f"{seconds}s"], check=True,
                       stderr=subprocess.DEVNULL)
        ended = int(time.time() * 1000)
        time.sleep(delay_ms / 1000 + 5)
        status = Path(f"/proc/{follower.pid}/status").read_text()
        rss = int(next(l for l in status.splitlines() if l.startswith("VmHWM")).split()[1]) * 1024
        follower.terminate()
        follower.wait()
        with sqlite3.connect(store) as db:
            commits = db.execute("SELECT frontier, committed_at_ms FROM commits ORDER BY frontier").fetchall()
        frontiers = [c[0] for c in commits]
        latencies = []
        for ts in range(began + 3_000, ended - 500, 10):
            i = bisect.bisect_right(frontiers, ts)
            if i < len(commits):
                latencies.append(commits[i][1] - ts - delay_ms)
        latencies.sort()
        p50, p99 = latencies[len(latencies) // 2], latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
        log(f"freshness: run {run + 1}/{runs}: p50 {p50} ms, p99 {p99} ms over the delay, {len(commits)} commits, "
            f"{rss / 2**30:.2f} GiB")
        samples.append((p50, p99, rss))
        shutil.rmtree(logs)
    return {"rate": rate, "seconds": seconds, "tick": tick, "p50": statistics.median(s[0] for s in samples),
            "p99": statistics.median(s[1] for s in samples), "rss": max(s[2] for s in samples), "runs": runs}


class KafkaBroker:
    """A nisshi broker of the harness's own (scripts/kafka.sh, which builds it when missing),
    stopped on exit."""

    def __init__(self, scratch):
        self.dir = scratch / "kafka"
        port = free_ports(1)[0]
        started = subprocess.run(["bash", ROOT / "scripts" / "kafka.sh", "start", self.dir, str(port)],
                                 capture_output=True, text=True)
        if started.returncode != 0:
            raise SystemExit(f"the Kafka broker did not start: {started.stderr}")
        self.address = started.stdout.strip()

    def __enter__(self):
        return self

    def __exit__(self, *_):
        subprocess.run(["bash", ROOT / "scripts" / "kafka.sh", "stop", self.dir], capture_output=True)


def kafka_rounds(logs, scratch, runs):
    """Issue 29: the default set loaded into a topic of the harness's own broker (`produce`, timed
    once), then replayed from it (`run --kafka -w 2`) in the same rounds as the file replay of the
    same set. The broker runs on the same 2 cores: its work is in the Kafka replay's time."""
    with KafkaBroker(scratch) as broker:
        log(f"loading {logs} into topic clicks on {broker.address}")
        started = time.monotonic()
        subprocess.run([BINARY, "produce", "--brokers", broker.address, "--topic", "clicks", "--logs", logs], check=True,
                       stderr=subprocess.DEVNULL)
        produce_s = time.monotonic() - started
        out = scratch / "out-kafka"
        configs = [
            ("run, 1×2 (in the Kafka rounds)", [[BINARY, "run", "--logs", logs, "--out", out, "-w", "2"]]),
            ("run, 1×2 from Kafka (broker on the same cores)",
             [[BINARY, "run", "--kafka", broker.address, "--topic", "clicks", "--out", out, "-w", "2"]]),
        ]
        files, kafka = interleaved(configs, runs)
        kafka["produce_s"] = produce_s
        kafka["time_ratio"] = kafka["median"] / files["median"]
        return files, kafka


def harness_python_with(scratch_root, packages):
    """A virtual environment of the harness's own, made once, with `packages` installed."""
    venv = scratch_root / "venv"
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    missing = [p for p in packages
               if subprocess.run([python, "-c", f"import {p}"], capture_output=True).returncode != 0]
    if missing:
        log(f"installing {', '.join(missing)} into {venv}")
        subprocess.run([python, "-m", "pip", "install", "--quiet", *missing], check=True)
    return python


def peers_python(scratch_root):
    """A virtual environment of the harness's own with the peers (DuckDB, chDB), made once."""
    return harness_python_with(scratch_root, ("duckdb", "chdb"))


def peer_versions(python):
    code = "import duckdb, chdb; print(f'DuckDB {duckdb.__version__}, chDB {chdb.__version__}')"
    return subprocess.run([python, "-c", code], capture_output=True, text=True).stdout.strip()


def machine():
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem = next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal"))
        mem_gib = int(mem.split()[1]) / 2**20
    except (OSError, StopIteration):
        mem_gib = 0
    return f"{os.cpu_count()} cores ({cpu}), {mem_gib:.0f} GiB, {platform.system()} {platform.release()}"


def machine_label():
    """A short name of this machine for each row: cores, CPU family, memory."""
    full = machine()
    cpu = full.split("(", 1)[1].split(")", 1)[0] if "(" in full else "?"
    family = next((w for w in ("EPYC", "Xeon", "Ryzen", "Core", "Graviton", "Neoverse") if w in cpu), cpu.split()[0])
    return f"{os.cpu_count()}c {family} {full.split('), ', 1)[-1].split(' GiB')[0]}G"


def commit():
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    # The harness's own output files do not make the measured build a different one.
    changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/RESULTS.md", ":!bench/RESULTS.json")
    return head + (" (with uncommitted changes)" if changed else "")


def render(results, lines, args, built_from, serving, saved):
    by_name = {r["name"]: r for r in results}
    floor = {1: by_name.get("parse-only, 1 thread"), 2: by_name.get("parse-only, 2 threads")}
    rows = []
    for r in results:
        if not r.get("date") and r.get("commit"):
            # Rows saved before rows carried their date: the date of the commit they were measured at.
            sha = r["commit"].split()[0]
            r["date"] = subprocess.run(["git", "show", "-s", "--format=%cs", sha], cwd=ROOT, capture_output=True,
                                       text=True).stdout.strip()
        rate = r["lines"] / r["median"]
        threads = r.get("threads")
        ratio = ""
        if threads in floor and floor[threads] and not r["name"].startswith("parse-only"):
            ratio = f"{100 * floor[threads]['median'] / r['median']:.1f}%"
        name = r["name"]
        cpu = f"{r['cpu']:.2f}" if "cpu" in r else ""
        stolen = f"{r['stolen']:.2f}" if "stolen" in r else ""
        rows.append(f"| {name} | {r['median']:.2f} | {r['min']:.2f}–{r['max']:.2f} | {cpu} | {stolen} | "
                    f"{rate / 1e6:.2f}M | {ratio} | {r['rss'] / 2**30:.2f} | {r.get('date', '')} | "
                    f"{r.get('commit', '')} | {r.get('machine', '')} |")
    text = [
        "# clickagg benchmark results",
        "",
        f"- Machine: {machine()}",
        f"- Latest run: commit {built_from}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; each row says when, "
        "at which commit and on which machine it was measured (rows from earlier partial runs stay)",
        f"- Data: `clickagg generate --events {args.events} --partitions 8 --seed 1` "
        f"(default and hot-key presets), {lines:,} lines each set including duplicates and bad rows",
        f"- Each figure: median of {args.runs} run(s), wall seconds; CPU seconds are user + system of every process "
        "(the harness's child processes: DuckDB's is its Python); stolen is the most core-seconds that the hypervisor "
        "gave to other guests during one of the runs (/proc/stat), time the run waited for a core it was promised; "
        "RSS is the peak of the largest process. "
        "The parse floor, the 1×1 and 1×2 runs and the peers are measured in interleaved rounds, one run of each per round.",
        *([f"- Peers: {saved['peer_versions']}; what each does is in bench/duckdb_job.py and bench/chdb_job.py"]
          if saved.get("peer_versions") else []),
        f"- Command: `python3 bench/bench.py {' '.join(sys.argv[1:])}`".rstrip(),
        "",
        "| what | median s | range s | CPU s | stolen s | lines/s | of parse floor (same threads) | peak RSS GiB | date | commit | machine |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    def speed(name):
        return by_name[name]["lines"] / by_name[name]["median"] if name in by_name else None
    checks = []
    w1, w2 = speed("run, 1×1 (processes × workers)"), speed("run, 1×2")
    hot = speed("run, 1×2, hot-key set")
    if w2:
        checks.append(f"- 2 workers: {w2 / 1e6:.2f}M lines/s")
    if w2 and floor[2]:
        checks.append(f"- Share of the 2-thread parse floor: {100 * floor[2]['median'] / by_name['run, 1×2']['median']:.1f}% "
                      "(target 40%)")
    targets = {"DuckDB 2 threads, DISTINCT ON": 2.5, "DuckDB 2 threads, exact tie-break": None, "chDB 2 threads, LIMIT 1 BY": 3.5}
    for peer, target in targets.items():
        if w2 and speed(peer):
            same = by_name[peer].get("commit") == by_name["run, 1×2"].get("commit")
            checks.append(f"- Against {peer}: {w2 / speed(peer):.2f}×" + (f" (target {target}×)" if target else "")
                          + ("" if same else " (rows from different runs: not side by side)"))
    if w1 and w2:
        # No longer a target (it depends on how independent the VM's two vCPUs are); reported.
        check = f"- 1 → 2 workers: {w2 / w1:.2f}×"
        if floor[1] and floor[2]:
            check += (f"; the parse floor, whose threads share nothing, went {floor[1]['median'] / floor[2]['median']:.2f}× "
                      "faster with 2 threads in the same rounds: what this machine gives two threads")
        checks.append(check)
    if "run, 1×2 with --serve (to replay complete)" in by_name:
        served = by_name["run, 1×2 with --serve (to replay complete)"]
        if "time_ratio" in served:
            checks.append(f"- `--serve` against the plain replay in the same rounds (issue 25): {served['time_ratio']:.2f}× the time "
                          f"(target 1.5×), {served['rss_ratio']:.2f}× the peak RSS, {served['rss'] / 2**30:.2f} GiB (target 2.5 GiB)")
    for row in by_name.values():
        if "rss_ratio_to_short" in row:
            checks.append(f"- Peak RSS of a `--serve` replay four times as long at the same rate (issue 25): "
                          f"{row['rss_ratio_to_short']:.2f}× (target 1.2×; {row['rss'] / 2**30:.2f} GiB at {row['minutes']} min)")
    kafka = by_name.get("run, 1×2 from Kafka (broker on the same cores)")
    if kafka:
        rate = kafka["lines"] / kafka["median"]
        checks.append(f"- Replay from Kafka (issue 29): {rate / 1e6:.2f}M events/s, broker included (target 1M/s); "
                      f"{kafka.get('time_ratio', 0):.2f}× the file replay's time in the same rounds"
                      + (f"; `produce` loaded the set in {kafka['produce_s']:.1f} s" if kafka.get("produce_s") else ""))
    if hot and w2:
        checks.append(f"- Hot-key set: {100 * hot / w2:.0f}% of the default set's speed (target within 15%)")
    if checks:
        text += ["## Ratios (same rounds) and targets", "", *checks, ""]
    if serving:
        text += [
            "## Query latency while ingesting (issue 5)",
            "",
            "`wrk -t2 -c200` for 8 s per endpoint against `run -w 2 --serve` while it replays the default set:",
            "200 connections, each sending its next request as soon as the last is answered (a closed loop, so",
            "the load is as high as the machine allows; wrk's two threads, clickagg's two workers and the",
            "server's event loop share 2 cores). Medians of the runs; each run's p99 is listed too.",
            "",
            "| endpoint | p50 ms | p99 ms | each run's p99 ms | requests/s | non-2xx |",
            "|---|---|---|---|---|---|",
            *[f"| {name} | {v['p50']:.2f} | {v['p99']:.2f} | {', '.join(f'{p:.1f}' for p in v.get('p99_runs', []))} "
              f"| {v['rps']:.0f} | {v['errors']} |" for name, v in serving.items()],
            "",
        ]
        baseline = saved.get("serving_baseline")
        if baseline:
            text += [
                f"Side by side with `{baseline['binary']}` (`--baseline`), measured in the same rounds, right before",
                "this build in each:",
                "",
                "| endpoint | build | p50 ms | p99 ms | each run's p99 ms | requests/s | non-2xx |",
                "|---|---|---|---|---|---|---|",
                *[f"| {name} | {build} | {v['p50']:.2f} | {v['p99']:.2f} | {', '.join(f'{p:.1f}' for p in v['p99_runs'])} "
                  f"| {v['rps']:.0f} | {v['errors']} |"
                  for name in serving for build, figures in (("baseline", baseline["figures"]), ("this build", serving))
                  for v in [figures[name]]],
                "",
            ]
    if saved.get("recovery"):
        text += [
            "## Recovery after SIGKILL (issue 6)",
            "",
            "A follower (`run --follow -w 2 --tick 1m`, default lateness and windows) commits every row of the",
            "logs and is killed; a new one is timed from its start to its `recovered:` line. Same rate (20k",
            "events per minute of event time), two lengths:",
            "",
            "| log length | events | bytes | recovery median s | range s |",
            "|---|---|---|---|---|",
            *[f"| {r['minutes']} min | {r['events']:,} | {r['bytes']:,} | {r['median']:.2f} | {r['min']:.2f}–{r['max']:.2f} |"
              for r in saved["recovery"]],
            "",
        ]
    if saved.get("freshness"):
        f = saved["freshness"]
        text += [
            "## Freshness (issue 6)",
            "",
            f"`clickagg feed` appends {f['rate']:,} clicks/s (4 partitions, ts = the wall clock) for {f['seconds']} s while",
            f"`run --follow -w 2 --tick {f['tick']}` commits; latency = commit time − ts − watermark delay (5 s):",
            "",
            f"- p50 {f['p50']} ms, p99 {f['p99']} ms (target: p99 under 1000 ms); peak RSS {f['rss'] / 2**30:.2f} GiB",
            "",
        ]
    if saved.get("soak"):
        k = saved["soak"]
        gib = lambda b: f"{b / 2**30:.2f} GiB" if b else "n/a"
        text += [
            "## Soak: following and serving for hours of event time (issue 25)",
            "",
            f"`run --follow --store … --serve` (2 workers) while `feed --time-scale {k['time_scale']} --rate {k['rate']}` appends",
            f"{k['hours']} h of event time ({k['rate']:,} clicks per wall second), RSS sampled every few seconds "
            f"(at {k.get('commit', '?')}; {k['wall_s']} s of wall time; {k['reached_hours']:.2f} h reached). Plot: `{k['plot']}`.",
            "",
            f"- RSS at 2 h of event time {gib(k['rss_2h'])}, at the end {gib(k['rss_end'])}"
            + (f": {k['ratio']:.2f}× (target 1.15×)" if "ratio" in k else "") + f"; peak {gib(k['peak'])}"
            + (f"; the follower used {k['cpu_s']:.0f} s of CPU" if k.get("cpu_s") else ""),
            "",
        ]
    return "\n".join(text)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("CLICKAGG_BENCH_DATA", ROOT / "bench" / ".data")))
    parser.add_argument("--only", default=",".join(GROUPS), help="comma-separated groups: " + ", ".join(GROUPS + OPTIONAL_GROUPS))
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "RESULTS.md")
    parser.add_argument("--baseline", type=Path,
                        help="another clickagg binary (e.g. an earlier build) whose serving latency is measured in "
                             "the same rounds as this build's, side by side")
    args = parser.parse_args()
    groups = set(args.only.split(","))
    if groups - set(GROUPS + OPTIONAL_GROUPS):
        parser.error(f"unknown group(s) {sorted(groups - set(GROUPS + OPTIONAL_GROUPS))}; choose from {GROUPS + OPTIONAL_GROUPS}")

    log("building clickagg (release)")
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    built_from = commit()
    args.data.mkdir(parents=True, exist_ok=True)
    global BINARY
    frozen = args.data / "clickagg"
    shutil.copy2(BINARY, frozen)
    BINARY = frozen
    # The soak and the lengths use sets of their own: alone, they need no default set.
    if groups - {"soak", "lengths"}:
        default, lines = dataset(args.data, f"default-{args.events}", args.events, "default")
    else:
        marker = args.data / f"default-{args.events}" / ".bench.json"
        default, lines = None, json.loads(marker.read_text())["lines"] if marker.exists() else 0
    results = []
    serving = serving_baseline = recovered = fresh = peer_versions_seen = soaked = None
    with tempfile.TemporaryDirectory(prefix="clickagg-bench-") as scratch:
        scratch = Path(scratch)
        out = scratch / "out"

        def add(result, threads, set_lines=lines):
            result["threads"], result["lines"] = threads, set_lines
            results.append(result)

        # The floor and the runs compared with it, and with each other, in interleaved rounds.
        compared = []
        if "floor" in groups or "throughput" in groups:
            for threads in (1, 2):
                compared.append((threads, f"parse-only, {threads} thread{'s' if threads > 1 else ''}",
                                 [[BINARY, "parse-only", "--logs", default, "-w", str(threads)]]))
        if "throughput" in groups or "cluster" in groups:
            compared.append((1, "run, 1×1 (processes × workers)", [[BINARY, "run", "--logs", default, "--out", out, "-w", "1"]]))
        if "throughput" in groups or "cluster" in groups or "peers" in groups:
            compared.append((2, "run, 1×2", [[BINARY, "run", "--logs", default, "--out", out, "-w", "2"]]))
        if "peers" in groups:
            if not any(name == "parse-only, 2 threads" for _, name, _ in compared):
                compared.append((2, "parse-only, 2 threads", [[BINARY, "parse-only", "--logs", default, "-w", "2"]]))
            python = peers_python(args.data)
            peer_versions_seen = peer_versions(python)
            for name, (script, *flags) in PEERS.items():
                job = [python, ROOT / "bench" / script, "--logs", default, "--out", scratch / "peer", "--threads", "2", *flags]
                compared.append((2, name, [job]))
        for (threads, _, _), result in zip(compared, interleaved([(name, commands) for _, name, commands in compared], args.runs)):
            add(result, threads)
        if "kafka" in groups:
            files, kafka = kafka_rounds(default, scratch, args.runs)
            add(files, 2)
            add(kafka, 2)
        if "hotkey" in groups:
            hot, hot_lines = dataset(args.data, f"hot-key-{args.events}", args.events, "hot-key")
            add(repeat("run, 1×2, hot-key set", [[BINARY, "run", "--logs", hot, "--out", out, "-w", "2"]], args.runs), 2, hot_lines)
        if "cluster" in groups:
            add(repeat("run, 2×1 (two processes on loopback)", cluster_commands(default, out, 2, 1, scratch), args.runs), 2)
        if "serving" in groups:
            # Latency first: measured right after the three full --serve replays (each ends by
            # killing a 6 GiB process), the first latency run's p99 was 20-28 ms in four sets
            # of four, against ~8.5 ms for the others and for a first run measured alone.
            serving, serving_baseline = serving_latency(default, scratch, args.runs, baseline=args.baseline)
            served, beside = serving_replay(default, scratch, args.runs)
            add(served, 2)
            add(beside, 2)
        if "lengths" in groups:
            for row in serving_lengths(args.data, scratch, args.runs):
                add(row, 2, row["events"])
        if "recovery" in groups:
            recovered = recovery(args.data, scratch, args.runs)
        if "freshness" in groups:
            fresh = freshness(scratch, args.runs)
        if "soak" in groups:
            soaked = soak(args.data, scratch, args.results.parent)

    # Rows from earlier runs of other groups stay, each with the commit it was measured at.
    store = args.results.with_suffix(".json")
    saved = json.loads(store.read_text()) if store.exists() else {}
    if saved.get("events") != args.events:
        saved = {"events": args.events, "rows": {}, "serving": None}
    measured_at, label = time.strftime("%Y-%m-%d", time.gmtime()), machine_label()
    for r in results:
        r["commit"], r["date"], r["machine"] = built_from, measured_at, label
        saved["rows"][r["name"]] = r
    # The old DuckDB row came from a job no DuckDB user would write (a sort of every row): gone.
    saved["rows"].pop("DuckDB 2 threads, batch job", None)
    # The default set's size, as last read (a run of the soak or lengths alone reads no set).
    lines = lines or saved.get("lines", 0)
    saved["lines"] = lines
    if peer_versions_seen:
        saved["peer_versions"] = peer_versions_seen
    if serving:
        saved["serving"] = serving
        saved["serving_baseline"] = {"binary": str(args.baseline), "figures": serving_baseline} if serving_baseline else None
    if recovered:
        saved["recovery"] = recovered
    if fresh:
        saved["freshness"] = fresh
    if soaked:
        soaked["commit"] = built_from
        saved["soak"] = soaked
    store.write_text(json.dumps(saved, indent=1))
    order = ["parse-only, 1 thread", "parse-only, 2 threads", "run, 1×1 (processes × workers)", "run, 1×2",
             "run, 1×2, hot-key set", "run, 2×1 (two processes on loopback)", "run, 1×2 (in the Kafka rounds)",
             "run, 1×2 from Kafka (broker on the same cores)", "run, 1×2 (in the --serve rounds)",
             "run, 1×2 with --serve (to replay complete)", *PEERS]
    merged = sorted(saved["rows"].values(), key=lambda r: order.index(r["name"]) if r["name"] in order else len(order))
    report = render(merged, lines, args, built_from, saved["serving"], saved)
    args.results.write_text(report)
    print(report)
    log(f"wrote {args.results}")


if __name__ == "__main__":
    main()
