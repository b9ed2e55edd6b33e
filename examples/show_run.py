"""Print what a finished quickstart run produced: the served completion and the report paths.

Reads only the run record (gcupipe.lock.json), so it works for cached stages too:
    python examples/show_run.py runs/quickstart
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(run_dir: Path) -> int:
    lock = json.loads((run_dir / "gcupipe.lock.json").read_text())
    outputs = {stage["id"]: stage.get("outputs") or {} for stage in lock["stages"]}
    checks_file = outputs.get("serve", {}).get("checks_file")
    if checks_file and Path(checks_file).is_file():
        for check in json.loads(Path(checks_file).read_text()):
            if check.get("endpoint") == "/v1/completions":
                print(f"completion: {check.get('text')!r}")
    validate = outputs.get("validate", {})
    if validate:
        print(f"validation report: {validate.get('report_markdown')}")
        agreement = validate.get("token_agreement")
        print(
            f"  perplexity {(validate.get('ppl_increase') or 0):+.2%}, top-1 agreement "
            + ("-" if agreement is None else f"{agreement:.1%}")
            + " where the float model is confident"
        )
    print(f"run record: {run_dir / 'gcupipe.lock.json'}")
    return 0 if lock.get("outcome") == "ok" else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/quickstart")))
