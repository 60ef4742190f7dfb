"""The bench's verdicts and its markdown table, computed from the results dictionary alone.

The JSON file and the table are made from the same dictionary, so a saved result can be re-rendered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["TARGETS", "Row", "render", "rows"]

# The targets, in one place: each figure's limit and how the table states it.
TARGETS = {
    "drain_vs_raw_min": 0.7,
    "cpu_vs_raw_max": 1.5,
    "rss_growth_max": 0.10,
    "latency_bound_min": 0.8,
    "p99_over_poll_max_s": 1.0,
}


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the table."""

    figure: str
    measured: str
    target: str
    verdict: str


def _n(value: float) -> str:
    return f"{value:,.0f}"


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else "PASS" if ok else "**FAIL**"


def _problem(phase: dict[str, Any]) -> str | None:
    """Why a phase has no valid figure (``ERROR`` it did not run, ``INVALID`` its checks failed), or None."""
    if "error" in phase:
        return f"ERROR: {phase['error']}"
    if phase.get("problems"):
        return "INVALID: " + "; ".join(phase["problems"])
    return None


def _raw_runs(raw: dict[str, Any]) -> str:
    """The two raw runs behind a mean ceiling, for the table."""
    runs = raw.get("runs")
    if not runs:
        return ""
    before, after = runs
    return (
        f"; mean of a run before the drains ({_n(before['rate_per_s'])} msg/s, {before['cpu_per_10k_s']:.2f} s) "
        f"and one after ({_n(after['rate_per_s'])} msg/s, {after['cpu_per_10k_s']:.2f} s)"
    )


def rows(results: dict[str, Any]) -> list[Row]:
    """The table's rows for ``results`` (phases that did not run are left out)."""
    out: list[Row] = []
    raw: dict[str, Any] = results.get("raw") or {}
    raw_ok = bool(raw) and _problem(raw) is None
    if raw:
        what = f"raw ceiling: aio-pika, {_n(raw['details'])} events, {raw['window']} in flight"
        problem = _problem(raw)
        if problem:
            out.append(Row(what, problem, "reference", "n/a"))
        else:
            out.append(
                Row(
                    what,
                    f"{_n(raw['rate_per_s'])} msg/s; {raw['cpu_per_10k_s']:.2f} CPU s per 10k "
                    f"(body {_n(raw['body_bytes_mean'])} B mean)" + _raw_runs(raw),
                    "reference",
                    "—",
                )
            )
    drain = results.get("drain")
    if drain is not None:
        what = f"task-bridge drains {_n(drain['details'])} (startup included)"
        problem = _problem(drain)
        if problem:
            out.append(Row(what, problem, f"≥ {TARGETS['drain_vs_raw_min']} x raw", "**FAIL**"))
        else:
            ratio = drain["rate_per_s"] / raw["rate_per_s"] if raw_ok else None
            measured = f"{_n(drain['rate_per_s'])} details/s in {drain['wall_s']:.2f} s"
            if ratio is not None:
                measured += f" = {ratio:.3f} x raw"
            out.append(
                Row(
                    what,
                    measured,
                    f"≥ {TARGETS['drain_vs_raw_min']} x raw",
                    _verdict(None if ratio is None else ratio >= TARGETS["drain_vs_raw_min"]),
                )
            )
            cpu_ratio = drain["cpu_per_10k_s"] / raw["cpu_per_10k_s"] if raw_ok else None
            measured = f"{drain['cpu_per_10k_s']:.2f} s"
            if cpu_ratio is not None:
                measured += f" vs raw {raw['cpu_per_10k_s']:.2f} s = {cpu_ratio:.3f} x"
            out.append(
                Row(
                    "CPU seconds per 10k events (bridge process, startup included)",
                    measured,
                    f"≤ {TARGETS['cpu_vs_raw_max']} x raw",
                    _verdict(None if cpu_ratio is None else cpu_ratio <= TARGETS["cpu_vs_raw_max"]),
                )
            )
    tuned = results.get("raw-tuned")
    if tuned is not None and _problem(tuned) is None and drain is not None and _problem(drain) is None:
        out.append(
            Row(
                "for information: the raw publisher with the bridge's process tuning (`bridge.runtime`)",
                f"{_n(tuned['rate_per_s'])} msg/s, {tuned['cpu_per_10k_s']:.2f} CPU s per 10k; against it the "
                f"drain is {drain['rate_per_s'] / tuned['rate_per_s']:.3f} x and its CPU "
                f"{drain['cpu_per_10k_s'] / tuned['cpu_per_10k_s']:.3f} x",
                "—",
                "info",
            )
        )
    latency = results.get("latency")
    if latency is not None:
        what = (
            f"drain {_n(latency['details'])} with {latency['latency_ms']:g} ms upstream latency, "
            f"page {latency['page_size']}"
        )
        target = f"≥ {TARGETS['latency_bound_min']} x min(P/L, raw)"
        problem = _problem(latency)
        if problem:
            out.append(Row(what, problem, target, "**FAIL**"))
        else:
            rt_ratio = latency["rate_per_s"] / latency["bound_per_s"]
            measured = f"{_n(latency['rate_per_s'])} details/s = {rt_ratio:.3f} x P/L ({_n(latency['bound_per_s'])}/s)"
            # Above the broker's ceiling the round trips do not bind: the target is checked against what does.
            bound = min(latency["bound_per_s"], raw["rate_per_s"]) if raw_ok else latency["bound_per_s"]
            ratio = latency["rate_per_s"] / bound
            measured += f"; {ratio:.3f} x min(P/L, raw)"
            if drain is not None and _problem(drain) is None:
                # What the round trips themselves cost: the same drain with no latency, same run.
                measured += f"; {latency['rate_per_s'] / drain['rate_per_s']:.3f} x the drain without latency"
            out.append(Row(what, measured, target, _verdict(ratio >= TARGETS["latency_bound_min"])))
    rss = results.get("rss")
    if rss is not None:
        small, large = rss["small"], rss["large"]
        what = f"peak RSS draining {_n(small['details'])} vs {_n(large['details'])}"
        target = f"within {TARGETS['rss_growth_max']:.0%}"
        problem = _problem(small) or _problem(large)
        if problem:
            out.append(Row(what, problem, target, "**FAIL**"))
        else:
            ratio = large["max_rss_mib"] / small["max_rss_mib"]
            out.append(
                Row(
                    what,
                    f"{small['max_rss_mib']:.1f} MiB vs {large['max_rss_mib']:.1f} MiB = {ratio:.3f} x",
                    target,
                    _verdict(ratio <= 1 + TARGETS["rss_growth_max"]),
                )
            )
    steady = results.get("steady")
    if steady is not None:
        limit = steady["poll_interval_s"] + TARGETS["p99_over_poll_max_s"]
        what = (
            f"detail upstream → event delivered from the queue, {steady['rate_per_s']:g} details/s, "
            f"poll interval {steady['poll_interval_s']:g} s"
        )
        target = f"p99 ≤ {limit:g} s"
        problem = _problem(steady)
        if problem:
            out.append(Row(what, problem, target, "**FAIL**"))
        elif not steady["samples"]:
            out.append(Row(what, "no samples", target, "**FAIL**"))
        else:
            out.append(
                Row(
                    what,
                    f"p50 {steady['p50_s']:.3f} s, p99 {steady['p99_s']:.3f} s, max {steady['max_s']:.3f} s "
                    f"({steady['samples']} details)",
                    target,
                    _verdict(steady["p99_s"] <= limit),
                )
            )
    return out


def render(results: dict[str, Any]) -> str:
    """The markdown table of ``results``, followed by the notes a reader needs to interpret it."""
    lines = ["| figure | measured | target | result |", "|---|---|---|---|"]
    lines += [f"| {r.figure} | {r.measured} | {r.target} | {r.verdict} |" for r in rows(results)]
    lines.append("")
    lines += [f"- {note}" for note in _notes(results)]
    return "\n".join(lines)


def _notes(results: dict[str, Any]) -> list[str]:
    machine = results["machine"]
    notes = [
        f"{machine['cores']} cores, load average {machine['load_start']} at the start and "
        f"{machine['load_end']} at the end; broker {results['broker']}; Python {machine['python']}; "
        f"{results['started']}.",
    ]
    if machine.get("env"):
        shown = " ".join(f"{k}={v}" for k, v in sorted(machine["env"].items()))
        notes.append(f"Run with `{shown}` in the environment of every process.")
    command = results["args"].get("bridge_command")
    if command:
        notes.append(f"task-bridge started as `{command}` (not this checkout's `python -m bridge`).")
    startup = results.get("startup")
    if startup is not None and _problem(startup) is None:
        notes.append(
            f"Bridge figures include the process's startup: `run --once` on an empty backlog takes "
            f"{startup['wall_s']:.2f} s and {startup['cpu_s']:.2f} CPU s (interpreter, imports, broker "
            f"connection, topology, one poll)."
        )
    drain = results.get("drain")
    if drain is not None and _problem(drain) is None and startup is not None and _problem(startup) is None:
        net_wall = drain["wall_s"] - startup["wall_s"]
        net_cpu = drain["cpu_s"] - startup["cpu_s"]
        if net_wall > 0:
            notes.append(
                f"Without that startup the drain runs at {_n(drain['details'] / net_wall)} details/s and "
                f"{net_cpu / drain['details'] * 10_000:.2f} CPU s per 10k events; its peak RSS is "
                f"{drain['max_rss_mib']:.1f} MiB."
            )
    latency = results.get("latency")
    if latency is not None:
        bound = latency["bound_per_s"]
        notes.append(
            f"Round-trip bound: with page size P and upstream latency L, the bridge (reading ahead, its default) "
            f"has one poll at a time under way, each bringing at most P new details, so it moves at most P / L "
            f"details/s: {latency['page_size']} / {latency['latency_ms'] / 1000:g} s = {_n(bound)}/s. Polling page 1 "
            f"alone would also wait an acknowledgement round trip before newer details show: P / (2 L) = "
            f"{_n(bound / 2)}/s."
        )
        if "ack_bound_per_s" in latency:
            notes.append(
                f"Acknowledgements have a bound of their own: ack_concurrency x ack_batch_size / L = "
                f"{latency['ack_concurrency']} x {latency['ack_batch_size']} / {latency['latency_ms'] / 1000:g} s "
                f"= {_n(latency['ack_bound_per_s'])}/s."
            )
        raw = results.get("raw")
        if raw is not None and _problem(raw) is None and bound > raw["rate_per_s"]:
            notes.append(
                f"The round-trip bound is above the raw broker ceiling ({_n(raw['rate_per_s'])} msg/s), so here the "
                f"broker binds, not the round trips: the target is checked against min(P / L, raw)."
            )
        drain = results.get("drain")
        if drain is not None and _problem(drain) is None and _problem(latency) is None:
            kept = latency["rate_per_s"] / drain["rate_per_s"]
            notes.append(
                f"With {latency['latency_ms']:g} ms of latency the bridge keeps {kept:.0%} of its own rate without "
                f"latency ({_n(latency['rate_per_s'])} vs {_n(drain['rate_per_s'])} details/s in this run): the "
                f"round trips cost {max(0.0, 1 - kept):.0%}; the rest of any gap to min(P / L, raw) is the CPU per "
                f"event that the drain without latency pays as well."
            )
    rss = results.get("rss")
    if rss is not None and rss.get("reduced"):
        notes.append(f"Reduced run: the large RSS run drains {_n(rss['large']['details'])} details, not 100,000.")
    steady = results.get("steady")
    if steady is not None and _problem(steady) is None and steady["samples"]:
        notes.append(
            f"Latency is measured from sending the `POST /_control` that adds a detail to the consumer receiving "
            f"its event (median POST round trip {steady['post_rtt_median_s'] * 1000:.1f} ms, so at most that much "
            f"too high), over {steady['duration_s']:g} s after a {steady['warmup_s']:g} s warm-up; the bridge "
            f"used {steady['cpu_s'] / steady['wall_s']:.1%} of a core meanwhile."
        )
    return notes
