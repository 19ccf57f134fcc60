"""Ship a calibration of the embedded default (maintainers): copy the gate and the cost-model
artifacts from a guardrail home into `guardrail/shipped/` and rewrite its checksummed index.

    guardrail calibrate --force && python -m guardrail.calibrate.ship [--home DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from guardrail.cache.artifacts import Artifacts, DirectoryStore
from guardrail.calibrate.gate import CalibrationConfig
from guardrail.calibrate.safety import SafetyConfig
from guardrail.calibrate.shipped import write_shipped
from guardrail.calibrate.store import artifact_key, safety_key
from guardrail.gate.artifact import Calibration
from guardrail.runtime.model import EMBEDDED_DEFAULT, load_model
from guardrail.runtime.paths import cache_root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m guardrail.calibrate.ship",
        description="Ship the embedded default's calibration from a guardrail home (maintainers, "
        "after `guardrail calibrate --force` with a change to calibration).",
    )
    parser.add_argument(
        "--home",
        type=Path,
        default=None,
        help="the guardrail home holding the calibration (default: $GUARDRAIL_HOME or the cache)",
    )
    parser.add_argument("--out", type=Path, default=None, help="default: the package folder")
    args = parser.parse_args(argv)
    items = _from_home(args.home or cache_root())
    root = write_shipped(items, args.out)
    for key in items:
        size = sum(f.stat().st_size for f in (root / key).iterdir())
        print(f"{root / key}  {size / 1024:.0f} KiB")
    return 0


def _from_home(home: Path) -> dict[str, Artifacts]:
    """The embedded default's gate and safety artifacts as stored under `home/artifacts`."""
    lm = load_model(EMBEDDED_DEFAULT)
    folders = DirectoryStore(home / "artifacts")
    gate_key = artifact_key(lm, CalibrationConfig())
    gate = folders.load(gate_key)
    if gate is None:
        raise SystemExit(f"{home / 'artifacts' / gate_key}: no gate calibration for this code")
    calibration = Calibration.from_artifacts(gate)
    key = safety_key(lm, calibration, SafetyConfig())
    safety = folders.load(key)
    if safety is None:
        raise SystemExit(f"{home / 'artifacts' / key}: no cost model/critic for this code")
    return {gate_key: gate, key: safety}


if __name__ == "__main__":
    raise SystemExit(main())
