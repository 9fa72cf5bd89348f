"""`digits feedback review` and `digits feedback export`: the command line over
digits.monitor.review.

    digits feedback review                       # pending corrections; the rule approves
    digits feedback review --approve 12 13 --reject 14
    digits feedback export                       # feedback/examples.npz, then `dvc add`"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from digits.core.errors import DigitsError, first_line
from digits.monitor import review

EXPORT = Path("feedback/examples.npz")


class ExportError(DigitsError):
    pass


def _items(args):
    from digits.monitor.logdb import log_url
    from digits.tracking.store import tracking_uri

    return review.engine(log_url(args.log_db, tracking_uri()))


def review_main(args) -> int:
    from digits.core.config import load_params

    params = load_params(getattr(args, "params", "params.yaml"))
    eng = _items(args)
    try:
        who = review.reviewer()
        if args.approve:
            review.decide(eng, args.approve, review.APPROVED, who)
        if args.reject:
            review.decide(eng, args.reject, review.REJECTED, who)
        if not args.no_rule:
            n = params.feedback.min_sources
            agreed = review.by_rule(review.corrections(eng), n)
            if agreed:
                review.decide(
                    eng, [c.id for c in agreed], review.APPROVED, "rule", f"{n} sources agree"
                )
                print(
                    f"digits feedback: {len(agreed)} correction(s) approved by the rule "
                    f"({n} distinct sources agree)"
                )
        items = review.corrections(eng)
    finally:
        eng.dispose()
    shown = items if args.all else [c for c in items if c.decision is None]
    print(
        f"{'id':>6}  {'status':8}  {'said':>11}  {'label':>11}  {'version':>7}  "
        f"{'source':15}  image"
    )
    for c in shown:
        print(
            f"{c.id:>6}  {c.decision or 'pending':8}  {c.answered:>11}  {c.label:>11}  "
            f"{c.version or '-':>7}  {(c.client or '-')[:15]:15}  {c.sha256[:12]}"
        )
        if args.images:
            print(ascii_art(c.image))
    pending = sum(c.decision is None for c in items)
    approved = sum(c.decision == review.APPROVED for c in items)
    print(f"{pending} pending, {approved} approved, {len(items) - pending - approved} rejected")
    return 0


def ascii_art(image: bytes) -> str:
    """A 28x28 piece in the terminal, two rows a line."""
    shades = " .:-=+*#%@"
    rows = [image[r * 28 : (r + 1) * 28] for r in range(28)]
    return "\n".join(
        "        "
        + "".join(shades[min(9, max(a, b) * 10 // 256)] for a, b in zip(top, low, strict=True))
        for top, low in zip(rows[::2], rows[1::2], strict=True)
    )


def dvc_root(path: Path) -> Path | None:
    """The DVC repository `path` lies in (the nearest folder above it holding `.dvc/`)."""
    return next((p for p in path.resolve().parents if (p / ".dvc").is_dir()), None)


def track(out: Path, root: Path) -> Path:
    """`dvc add out` in `root`: the file goes to DVC's cache, and `out.dvc` (its hash) and the
    folder's .gitignore are what git commits. Unchanged bytes leave the .dvc file as it was.
    Returns the .dvc file."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "dvc", "add", "-q", str(out.resolve())],
            cwd=root, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ExportError(
            f"dvc add {out}: {first_line(e)}; the file is written, run it yourself"
        ) from None
    if done.returncode:
        said = (done.stderr.strip() or done.stdout.strip()).splitlines()
        why = said[0] if said else f"exit {done.returncode}"
        raise ExportError(f"dvc add {out}: {why}; the file is written, run it again when fixed")
    return out.with_name(out.name + ".dvc")


def export_main(args) -> int:
    eng = _items(args)
    try:
        items = review.corrections(eng)
    finally:
        eng.dispose()
    out = Path(args.out)
    n, changed = review.export(items, out)
    state = "written" if changed else "unchanged"
    print(f"digits feedback: {n} approved example(s) -> {out} ({state})")
    root = None if getattr(args, "no_dvc", False) else dvc_root(out)
    if root is None:
        print(f"  not tracked (no DVC repository around it, or --no-dvc): dvc add {out}")
        return 0
    dvc_file = track(out, root)
    print(f"  tracked with DVC: commit {dvc_file} (git add {dvc_file} && git commit), "
          "then dvc push; dvc repro retrains with it")  # fmt: skip
    return 0
