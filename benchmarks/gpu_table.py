"""Issue #23's GPU table, as one markdown table, from the results ``gpu_check.sh`` leaves in its folder.

    python benchmarks/gpu_table.py gpu_results/

Each stage of ``gpu_check.sh`` writes ``<stage>.jsonl`` (the benchmark's ``--json`` lines), ``<stage>.txt``
(what it printed) and ``<stage>.rc`` (its exit status, ``124`` when its time cap stopped it, ``skipped`` when
the check's time budget was spent). Every row says ours, Cellpose's (4.2.1.1 or 3.1.1.2, same device, same
weights and inputs), ours / Cellpose in time, and where issue #23 sets a limit whether it is met; a stage
that failed becomes a row saying what failed. Prints numbers and ratios; the exit status is always 0.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Callable

#: dense bfloat16 tensor-core peak (TFLOPS) by a part of the GPU's name; the first match counts
PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0))
#: one forward of a 256 x 256 tile through the ViT-L Cellpose-SAM network
TILE_TFLOP = 0.65
#: limits of issue #23
POST_LIMIT, TRAIN_SAM_LIMIT, PEAK_LIMIT, LEGACY_EVAL_LIMIT = 0.5, 0.7, 0.40, 1.0
VIT_L_PARAMS = 250e6  # a network above this many parameters is the ViT-L (the tiny fixture has ~0.3 M)

Row = tuple[str, str, str, str, str, str]  # what, ours, Cellpose, ours / Cellpose, limit, met
HEADER = ("what", "ours", "Cellpose", "ours / Cellpose", "limit", "met")


def peak_tflops(name: str) -> float | None:
    """The dense bf16 peak of a GPU from its name (``NVIDIA H200``), None when not in the table."""
    return next((tf for key, tf in PEAK_BF16_TFLOPS if key.lower() in name.lower()), None)


def read_stage(folder: Path, stage: str) -> list[dict]:
    """The JSON lines of ``<stage>.jsonl`` (none when the file is missing or a line is cut off)."""
    path = folder / f"{stage}.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def why_missing(folder: Path, stage: str) -> str:
    """Why ``stage`` left no result: not run, skipped, stopped by its time cap, or its exit status and last line."""
    rc_file, log = folder / f"{stage}.rc", folder / f"{stage}.txt"
    if not rc_file.is_file():
        return "not run"
    rc = rc_file.read_text().strip()
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()] if log.is_file() else []
    last = lines[-1][:160] if lines else "no output"
    if rc == "skipped":
        return "skipped: the check's time budget was spent"
    if rc in ("124", "137"):
        return f"stopped by its time cap (see {stage}.txt)"
    if rc == "0":
        return f"no result (see {stage}.txt: {last})"
    return f"failed, exit {rc}: {last}"


def ratio(ours: float | None, ref: float | None) -> float | None:
    """ours / ref, None when either is missing or ref is 0."""
    if ours is None or ref is None or ref == 0 or not math.isfinite(ours) or not math.isfinite(ref):
        return None
    return ours / ref


def met(value: float | None, limit: float, below: bool = True) -> str:
    """``met`` / ``**not met**`` for value <= limit (``below``) or value >= limit; ``?`` without a value."""
    if value is None:
        return "?"
    ok = value <= limit if below else value >= limit
    return "met" if ok else "**not met**"


def fmt_ratio(r: float | None, extra: str = "") -> str:
    return (f"{r:.2f}x" if r is not None else "—") + (f" {extra}" if extra else "")


def failed_row(what: str, reason: str, limit: str = "") -> Row:
    return what, f"**{reason}**", "", "", limit, "not met" if limit else ""


# ------------------------------------------------------------------------------------------------ rows
def legacy_eval_rows(recs: list[dict], reason: str) -> list[Row]:
    if not recs:
        return [failed_row("Cellpose 1-3 U-Net (`cp_cyto`) with default settings, and its eval vs Cellpose 3",
                           reason, "starts; <= 1.0x C3")]
    r = recs[-1]
    st, dev = r["starts"], r["device"]
    starts = f"starts ({st['dtype']}, {st['masks']} masks)" if st["ok"] else f"**crashes**: `{st['error']}`"
    c3 = "C3 runs (float32)" if r.get("ref_s") is not None else f"C3: {r.get('ref_error', '?')}"
    rows = [(f"Cellpose 1-3 U-Net (`cp_cyto`) with default settings on {dev}", starts, c3, "—", "starts",
             "met" if st["ok"] else "**not met**")]
    q = ratio(r["ours_s"], r.get("ref_s"))
    lo, hi = r["sides"]
    rows.append((f"same, `use_bfloat16=False`: {r['n']} whole-cell RGB images ({lo}-{hi} px), channels [2, 1], "
                 "diameter 30", f"{r['ours_s']:.2f} s", f"C3 {r['ref_s']:.2f} s" if r.get("ref_s") else "—",
                 fmt_ratio(q), f"<= {LEGACY_EVAL_LIMIT:.1f}x C3", met(q, LEGACY_EVAL_LIMIT)))
    if r.get("agree") is not None:
        rows.append(("masks of those equal to C3's on the same device (AP@0.5 vs C3 >= 0.99)",
                     f"{r['agree']} / {r['n']} ({r['identical']} identical)", "—",
                     f"smallest AP@0.5 {r['min_ap50']:.3f}", "—", ""))
    return rows


def dynamics_rows(recs: list[dict], reason: str, size: int) -> list[Row]:
    limit = f"<= {POST_LIMIT}x C4"
    if not recs:
        return [failed_row(f"`compute_masks` and `masks_to_flows`, {size}²", reason, limit)]
    r = recs[-1]
    same = ("masks identical" if r.get("identical") else
            f"masks differ: AP@0.5 {r['ap50']:.3f}" if r.get("ap50") is not None else "")
    rows = []
    for step, what in (("compute_masks", f"`compute_masks`, lite's outputs, {r['size']}², {r['cells']} cells"),
                       ("masks_to_flows", f"`masks_to_flows`, {r['size']}²")):
        ours, ref = r["ours"][step], (r.get("ref") or {}).get(step)
        q = ratio(ours, ref)
        rows.append((what, f"{ours:.3f} s", f"C4 {ref:.3f} s" if ref is not None else r.get("ref_error", "—"),
                     fmt_ratio(q, f"({same})" if step == "compute_masks" and same else ""), limit, met(q, POST_LIMIT)))
    return rows


def _train_cell(run: dict | None, metric: str, who: str = "") -> str:
    if not run:
        return "—"
    mem = run.get("peak_gpu_gb")
    mem_s = f", peak {mem:.1f} GB" if mem is not None else f", peak RSS {run['peak_mb'] / 1024:.1f} GB"
    prec = f" {run['precision']}" if run.get("precision") else ""
    loss = f", last loss {run['final_loss']:.3f}" if run.get("final_loss") is not None else ""
    return f"{who}{run[metric]:.1f} s{prec}{mem_s}{loss}"


def cpsam_train_rows(recs: list[dict], reason: str) -> list[Row]:
    limit = f"<= {TRAIN_SAM_LIMIT}x C4"
    if not recs:
        return [failed_row("Cellpose-SAM fine-tuning vs C4", reason, limit)]
    r = recs[-1]
    what = (f"Cellpose-SAM fine-tuning ({r['weights']}), 3 nuclei images, {r['epochs']} epochs x {r['nimg']} crops "
            f"of {r['bsize']} px, batch {r['batch']}")
    if not r.get("ours"):
        return [failed_row(what, f"ours failed: {r.get('ours_error')}", limit)]
    q = ratio(r["ours"][r["metric"]], (r.get("ref") or {}).get(r["metric"]))
    ref_cell = _train_cell(r.get("ref"), r["metric"], "C4 ") if r.get("ref") else r.get("ref_error") or "—"
    rows = [(what, _train_cell(r["ours"], r["metric"]), ref_cell, fmt_ratio(q), limit, met(q, TRAIN_SAM_LIMIT))]
    for precision, other in (r.get("ours_other") or {}).items():
        q = ratio((other or {}).get(r["metric"]), (r.get("ref") or {}).get(r["metric"]))
        rows.append((f"the same, ours in {precision}", _train_cell(other, r["metric"]) if other else "failed",
                     ref_cell, fmt_ratio(q), "—", "—"))
    return rows


def _measured_cell(run: dict | None, err: str | None, who: str, value: str) -> str:
    """``who`` + ``value`` + the run's peak memory, or why there is no run."""
    if not run:
        return f"failed: {err}" if err else "—"
    mem = f", {run['peak_gb']:.1f} GB" if run.get("peak_gb") is not None else ""
    return f"{who}{value}{mem}"


def _eval_cell(run: dict | None, err: str | None, who: str = "") -> str:
    return _measured_cell(run, err, who, f"{run['seconds']:.2f} s" if run else "")


def cpsam_eval_rows(recs: list[dict], reason: str, what: str) -> list[Row]:
    if not recs:
        return [failed_row(what, reason)]
    rows = []
    for r in recs:
        bf16 = "bf16" if r["device"].startswith("cuda") else "float32"
        q = ratio((r.get("ours") or {}).get("seconds"), (r.get("ref") or {}).get("seconds"))
        rows.append((f"Cellpose-SAM `.eval` ({r['weights']}), {bf16}, batch 8, {r['label']} (compute_masks=False)",
                     _eval_cell(r.get("ours"), r.get("ours_error")), _eval_cell(r.get("ref"), r.get("ref_error"), "C4 "),
                     fmt_ratio(q), "—", ""))
    return rows


def vit_forward_rows(recs: list[dict], reason: str) -> list[Row]:
    if not recs:
        return [failed_row("ViT-L forward, bf16, batch 8 / 64", reason, f">= {PEAK_LIMIT:.0%} of bf16 peak")]
    rows = []
    for r in recs:
        ours, ref = r.get("ours"), r.get("ref")
        peak = peak_tflops(r.get("device_name", ""))
        vit_l = bool(ours and ours.get("params", 0) > VIT_L_PARAMS)
        share = ours["tiles_per_s"] * TILE_TFLOP / peak if ours and peak and vit_l else None
        cell = _fw_cell(ours, r.get("ours_error"))
        if ours and ours.get("attention"):
            cell += f", attention {ours['attention']}"
        if ours and vit_l:
            cell += f", {share:.0%} of bf16 peak" if share is not None else \
                f", % of bf16 peak unknown ({r.get('device_name')} not in gpu_table.PEAK_BF16_TFLOPS)"
        gated = r["batch"] >= 32 and vit_l
        limit = f">= {PEAK_LIMIT:.0%} of bf16 peak" if gated else "—"
        bf16 = "bf16" if r["device"].startswith("cuda") else "float32"
        q = ratio(ref["tiles_per_s"], ours["tiles_per_s"]) if ours and ref else None
        rows.append((f"ViT forward ({r['weights']}), {bf16}, batch {r['batch']}", cell,
                     _fw_cell(ref, r.get("ref_error"), "C4 "), fmt_ratio(q),
                     limit, met(share, PEAK_LIMIT, below=False) if gated else ""))
    return rows


def _fw_cell(run: dict | None, err: str | None, who: str = "") -> str:
    return _measured_cell(run, err, who, f"{run['tiles_per_s']:.0f} tiles/s" if run else "")


def legacy_train_rows(recs: list[dict], reason: str) -> list[Row]:
    if not recs:
        return [failed_row("Cellpose 1-3 U-Net fine-tuning, float32, vs C3", reason)]
    r = recs[-1]
    ours, ref = r.get("ours_float32"), r.get("ref")
    q = ratio((ours or {}).get("seconds"), (ref or {}).get("seconds"))
    return [(f"Cellpose 1-3 U-Net fine-tuning, float32, {r['epochs']} epochs x {r['nimg']} crops of {r['bsize']} px, "
             f"batch {r['batch']}", f"{ours['seconds']:.1f} s" if ours else "—",
             f"C3 {ref['seconds']:.1f} s" if ref else r.get("ref_error") or "—", fmt_ratio(q), "—", "")]


def pytest_rows(folder: Path) -> list[Row]:
    """The ``pytest -m gpu`` suite's summary line."""
    log = folder / "pytest_gpu.txt"
    if not log.is_file():
        return [failed_row("`pytest -m gpu` (each model kind on the device, training, the app's pipeline)",
                           why_missing(folder, "pytest_gpu"), "all pass")]
    lines = [ln.strip().strip("=").strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    summary = next((ln for ln in reversed(lines) if " in " in ln and ("passed" in ln or "failed" in ln
                                                                        or "error" in ln or "skipped" in ln)), None)
    ok = bool(summary) and "passed" in summary and "failed" not in summary and "error" not in summary
    return [("`pytest -m gpu` (each model kind on the device, training, the app's pipeline)",
             summary or why_missing(folder, "pytest_gpu"), "—", "—", "all pass", "met" if ok else "**not met**")]


#: (stage file, row builder) in the order of the issue's table
STAGES: tuple[tuple[str, Callable[[list[dict], str], list[Row]]], ...] = (
    ("legacy_eval", legacy_eval_rows),
    ("dynamics_1024", lambda recs, why: dynamics_rows(recs, why, 1024)),
    ("dynamics_2048", lambda recs, why: dynamics_rows(recs, why, 2048)),
    ("cpsam_train", cpsam_train_rows),
    ("cpsam_eval_2d", lambda recs, why: cpsam_eval_rows(recs, why, "Cellpose-SAM `.eval`, bf16, 2D images")),
    ("cpsam_eval_3d", lambda recs, why: cpsam_eval_rows(recs, why, "Cellpose-SAM `.eval`, bf16, do_3D stack")),
    ("vit_forward", vit_forward_rows),
    ("legacy_train", legacy_train_rows),
)


def table_rows(folder: Path) -> list[Row]:
    """Every row of the table from ``folder``; a stage without results gives a row saying why."""
    rows: list[Row] = []
    for stage, build in STAGES:
        recs = read_stage(folder, stage)
        try:
            rows += build(recs, why_missing(folder, stage) if not recs else "")
        except (KeyError, TypeError, ValueError) as e:  # a result line from another version of a benchmark
            rows.append(failed_row(stage, f"unreadable result ({type(e).__name__}: {e})"))
    return rows + pytest_rows(folder)


def markdown(rows: list[Row]) -> str:
    """The rows as one markdown table (``|`` inside a cell escaped)."""
    def line(cells: tuple[str, ...]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
    return "\n".join([line(HEADER), "|" + "---|" * len(HEADER)] + [line(r) for r in rows])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", nargs="?", default="gpu_results", help="gpu_check.sh's output folder")
    args = ap.parse_args(argv)
    folder = Path(args.folder)
    rows = table_rows(folder)
    dev_file = folder / "device.txt"
    device = "; ".join(ln.strip() for ln in dev_file.read_text().splitlines() if ln.strip()) if dev_file.is_file() else "?"
    print(f"Device: {device}. Ours vs the published Cellpose 4.2.1.1 (C4) and 3.1.1.2 (C3), same device, weights "
          "and inputs; ours / Cellpose is time (lower is faster).\n")
    print(markdown(rows))
    verdicts = [r[5] for r in rows if r[5] in ("met", "**not met**", "not met")]
    print(f"\nlimits met: {sum(v == 'met' for v in verdicts)} of {len(verdicts)}")


if __name__ == "__main__":
    main()
