"""CI: did the pipeline reproduce what main committed, bit for bit?

After `dvc repro` in a fresh clone, the train stage's model hash in dvc.lock and the bytes of
the committed metrics and history must equal the committed ones (see README: Reproducibility).
A mismatch names the file and exits 1. It also means a change that alters training must commit
its new lock, metrics and history, as DVC intends."""

import subprocess
import sys

import yaml

FILES = ["reports/metrics.json", "reports/train_history.csv"]
MODEL = "models/model.safetensors"


def committed(path: str) -> bytes:
    return subprocess.run(["git", "show", f"HEAD:{path}"], capture_output=True, check=True).stdout


def model_md5(lock_text: bytes) -> str | None:
    outs = yaml.safe_load(lock_text)["stages"].get("train", {}).get("outs", [])
    return next((o["md5"] for o in outs if o["path"] == MODEL), None)


def main() -> int:
    bad = []
    want = model_md5(committed("dvc.lock"))
    with open("dvc.lock", "rb") as f:
        got = model_md5(f.read())
    if got != want:
        bad.append(f"dvc.lock: train's {MODEL} md5 {got}, committed {want}")
    for path in FILES:
        with open(path, "rb") as f:
            if f.read() != committed(path):
                bad.append(f"{path}: differs from the committed file (git diff {path})")
    for line in bad:
        print(f"NOT REPRODUCED: {line}")
    if not bad:
        print(f"reproduced: {MODEL} md5 {got}, {', '.join(FILES)} byte-identical to HEAD")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
