"""`digits feedback review` and `digits feedback export`: the command line over
digits.monitor.review.

    digits feedback review                       # pending corrections; the rule approves
    digits feedback review --approve 12 13 --reject 14
    digits feedback export                       # feedback/examples.npz (DVC-tracked)"""

from __future__ import annotations

from pathlib import Path

from digits.monitor import review

EXPORT = Path("feedback/examples.npz")


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
    if changed:
        print(f"  track and commit it: dvc add {out} && git add {out}.dvc && git commit")
    return 0
