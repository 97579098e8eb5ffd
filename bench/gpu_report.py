"""bench/gpu.py's report: what fails the run, and gpu_report.md, the report's tables."""

from __future__ import annotations

from gpu_correctness import case_label

from uvit_cog.kernels.triton_tuning import KERNEL_NAMES


def failures(report: dict) -> list[str]:
    """What makes the run fail: a section error, a failed check, a non-finite training loss."""
    out = []
    for name, section in report["sections"].items():
        if section["status"] == "error":
            out.append(f"{name}: {section['error']}")
    for case in report["sections"].get("correctness", {}).get("cases", []):
        if not case["passed"]:
            out.append(f"correctness {case_label(case)}: {'; '.join(case['failures'])}")
    for run in report["sections"].get("training", {}).get("runs", []):
        if "error" in run:
            out.append(f"training {run['run']}: {run['error']}")
        for model, m in run.get("models", {}).items():
            if m["nonfinite_losses"]:
                out.append(f"training {run['run']} {model}: {m['nonfinite_losses']} non-finite losses")
    return out


def _f(x, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _table(heading: str, text: str, columns: list[str]) -> list[str]:
    """A report section's heading, its paragraph and the head of its table."""
    return ["", heading, "", text, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def _summary(report: dict) -> list[str]:
    """The run's header, its failures and one row per section."""
    lines = [f"# GPU suite: `{report['command']}`", "",
             f"{report['device']}, torch {report['torch']}, triton {report['triton']}, {report['started']}; "
             f"{report['seconds']:.0f} s of a {report['time_limit_s']:.0f} s limit. "
             f"Failures: {len(report['failures'])}.", ""]
    lines += [f"- {f}" for f in report["failures"][:50]]
    lines += ["", "| section | status | seconds | budget s | skipped |", "|---|---|---|---|---|"]
    for name, sec in report["sections"].items():
        lines.append(f"| {name} | {sec['status']} | {_f(sec.get('seconds'), 0)} | {_f(sec.get('budget_s'), 0)} | "
                     f"{len(sec.get('skipped', []))} |")
    for name, sec in report["sections"].items():
        if sec["status"] == "error":
            lines += ["", f"## {name}: error", "", "```", sec["traceback"], "```"]
    return lines


def _tune(tune: dict) -> list[str]:
    lines = _table("## Block sizes (tune)", f"Written to `{tune['tuned_file']}`: {tune['configs_written']} configs. "
                   "Time per call of the best and the slowest config (forward alone; dK/dV and dQ: forward+backward).",
                   ["kind", "dtype", "BLOCK_D", "shape", "kernel", "best (M, N, warps, stages)", "best ms",
                    "slowest ms", "failed"])
    for b in tune["buckets"]:
        for name in KERNEL_NAMES:
            cands = b["candidates"][name]
            ok = [c["s"] for c in cands if "error" not in c and c["s"] is not None]
            c = b["best"][name]
            best = f"{c['BLOCK_M']}, {c['BLOCK_N']}, {c['num_warps']}, {c['num_stages']}"
            lines.append(f"| {b['kind']} | {b['dtype']} | {b['block_d']} | {tuple(b['shape'])} | {name} | {best} | "
                         f"{_f(min(ok) * 1e3 if ok else None, 3)} | {_f(max(ok) * 1e3 if ok else None, 3)} | "
                         f"{len(cands) - len(ok)} |")
    return lines


def _correctness(c: dict) -> list[str]:
    lines = _table("## Triton kernels against the float64 reference (correctness)",
                   f"{c['passed']} passed, {c['failed']} failed, {len(c['skipped'])} skipped. Max error / bound "
                   f"(bound: {c['tolerances']} × max(max |reference|, {c['error_floor']})).",
                   ["kind", "dtype", "N", "M", "D", "mask", "out", "dq", "dk", "dv", "dsink", "passed"])
    for case in c["cases"]:
        ratios = [_f(e["max_error"] / e["bound"], 3) if (e := case["errors"].get(n)) else "–"
                  for n in ("out", "dq", "dk", "dv", "dsink")]
        mask = str(case["mask"]) + (" +sink" if case["sink"] else "")
        verdict = "yes" if case["passed"] else "NO: " + "; ".join(case["failures"])
        lines.append(f"| {case['kind']} | {case['dtype']} | {case['N']} | {case['M']} | {case['D']} | {mask} | "
                     + " | ".join(ratios) + f" | {verdict} |")
    return lines


def _attention(a: dict) -> list[str]:
    lines = _table(f"## Attention forward+backward, {a['dtype']} (attention)",
                   f"FLOPs: {a['flops']}. SDPA backends: {a['sdpa_backends']}. Ratios to the first SDPA row "
                   "(throughput: higher is better; memory: lower is better).",
                   ["shape (B, H, N, D)", "impl", "ms", "TFLOP/s", "× flash", "peak MiB", "× flash"])
    for shape in a["shapes"]:
        for r in shape["rows"]:
            if "unavailable" in r:
                lines.append(f"| {shape['label']} {tuple(shape['shape'])} | {r['impl']} | unavailable: "
                             f"{r['unavailable'][:120]} | | | | |")
                continue
            lines.append(f"| {shape['label']} {tuple(shape['shape'])} | {r['impl']} | {_f(r['ms'], 3)} | "
                         f"{_f(r['tflops'], 1)} | {_f(r.get('throughput_x_flash'))} | {_f(r['peak_mib'], 1)} | "
                         f"{_f(r.get('peak_x_flash'))} |")
    return lines


def _training(t: dict) -> list[str]:
    models = "; ".join(f"{label}: {kwargs}" for label, kwargs in t["models"].items())
    lines = _table("## Training U-ViC against U-ViT (training)", f"Models {models}; batch {t['batch']}.",
                   ["run", "model", "steps", "non-finite losses", "images/s", "U-ViC / U-ViT", "first-round s",
                    "loss: first 10 → last 10"])
    for run in t["runs"]:
        if "error" in run:
            lines.append(f"| {run['run']} | error: {run['error'][:200]} | | | | | | |")
            continue
        for name, m in run["models"].items():
            lines.append(f"| {run['run']} | {name} | {m['steps']} | {m['nonfinite_losses']} | "
                         f"{_f(m['images_per_s'], 1)} | {_f(run['ratio_uvic_over_uvit'], 3)} | "
                         f"{_f(m['first_round_s'], 1)} | {_f(m['first_losses_mean'], 4)} → "
                         f"{_f(m['last_losses_mean'], 4)} |")
        if run["note"]:
            lines.append(f"| {run['run']} | {run['note']} | | | | | | |")
    return lines


# Each section's tables, where the section has results: (section, the key its results sit under, the writer).
_TABLES = (("tune", "buckets", _tune), ("correctness", "cases", _correctness), ("attention", "shapes", _attention),
           ("training", "runs", _training))


def markdown(report: dict) -> str:
    """gpu_report.md: the summary, then each section's table, then what was skipped for time."""
    s = report["sections"]
    lines = _summary(report)
    for name, key, tables in _TABLES:
        if key in s.get(name, {}):
            lines += tables(s[name])
    skipped = [(name, x) for name, sec in s.items() for x in sec.get("skipped", [])]
    if skipped:
        lines += ["", "## Skipped for time", ""] + [f"- {name}: {x}" for name, x in skipped]
    return "\n".join(lines) + "\n"
