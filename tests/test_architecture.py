"""The import contract (.importlinter) holds: layers point down only, the UI reaches only the
workflow and service layers. `lint-imports` (import-linter) checks it; this test makes the suite
(and so CI, `scripts/run_tests.sh`) fail when an import breaks it. Also: no module over ~900 lines."""
from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "cellpose_web"
MAX_LINES = 900


def _lint_imports() -> list[str]:
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    if not Path(exe).exists():
        pytest.fail("import-linter is not installed: pip install -r requirements-dev.txt")
    return [exe, "--config", str(ROOT / ".importlinter"), "--no-cache"]


def test_import_contract_is_kept():
    proc = subprocess.run(_lint_imports(), cwd=ROOT, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": str(Path(sys.executable).parent)})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_contract_has_five_layers_and_no_exceptions():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / ".importlinter")
    layers = [line for line in cfg["importlinter:contract:layers"]["layers"].split("\n") if line.strip()]
    assert len(layers) >= 5
    for name in cfg.sections():
        assert "ignore_imports" not in cfg[name] and "exhaustive_ignores" not in cfg[name], name
    ui = cfg["importlinter:contract:ui"]
    forbidden = set(ui["forbidden_modules"].split())
    assert {"cellpose_web.models", "cellpose_web.registry", "cellpose_web.io", "cellpose_web.engine",
            "cellpose_web.measure", "cellpose_web.errors"} <= forbidden


def test_no_module_over_900_lines():
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_cellpose_compatible_names_still_import():
    """The imports the README shows (Cellpose's module names) keep working after the move into layers."""
    from cellpose_web import dynamics, edit, hints, io, measure, metrics, models, pipeline, registry, train, transforms
    from cellpose_web.engine import dynamics as engine_dynamics
    from cellpose_web.models import core, train as models_train
    from cellpose_web.workflows import pipeline as workflows_pipeline

    assert models.CellposeModel is core.CellposeModel and models.SizeModel and models.run_net
    assert io.imread_with_meta and io.save_masks and io.masks_flows_to_seg and io.load_seg and io.save_rois
    assert dynamics.compute_masks is engine_dynamics.compute_masks and dynamics.masks_to_flows
    assert metrics.average_precision and transforms.normalize99 and edit.MaskEditor and hints.suggest
    assert train.train_seg is models_train.train_seg and train.FINETUNE_DEFAULTS
    assert pipeline.process_file is workflows_pipeline.process_file and pipeline.SaveOptions
    assert measure.measure_cells and registry.resolve_model and registry.list_models
