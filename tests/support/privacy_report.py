"""What each privacy attack learned, and the report built from it.

Every attack test calls :func:`record` once per policy with what the attack learned, the bound
the table allows and whether it held; the rows go to a JSON-lines file
(``$PEAR_PRIVACY_RESULTS``, default ``.pear/privacy/results.jsonl``). ``python
tests/support/privacy_report.py`` (run by ``make privacy``) renders them into
``docs/PRIVACY.md``. Recording never fails a test: the bound is asserted by the test itself.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_RESULTS = ROOT / ".pear" / "privacy" / "results.jsonl"
DEFAULT_DOC = ROOT / "docs" / "PRIVACY.md"

#: The attacks, in report order: id -> (title, what it tries).
ATTACKS: dict[str, tuple[str, str]] = {
    "a": ("dictionary de-anonymisation",
          "hash every candidate retailer and store name with every string in its own config, "
          "under the pseudonym scheme the library documents, and look the pseudonyms it saw "
          "up in that dictionary"),
    "b": ("combining fields over time",
          "intersect each competitor's price bucket with its min/max buckets, the published "
          "changes (exact, bucketed, or just up/down) and every earlier hour, propagating "
          "intervals forward; the current price's interval is compared with the bucket the "
          "range scheme puts that price in"),
    "c": ("linking published numbers to sealed values",
          "compare every number a competitor's insight or an aggregate publishes with that "
          "competitor's withheld values (sealed, bucketed or never shared) of the same kind"),
    "d": ("names, presence and timing joined to identities",
          "search topics, envelopes, bodies, embedded certificates and retained presence for "
          "the clear names of companies and stores, and link identities across networks"),
    "e": ("re-sending and replaying to skew aggregates",
          "re-send its own observations, replay captured envelopes of others (on its own "
          "topics and on theirs) and its own, then compare the bridge's aggregates with the "
          "ground truth counted once per (company, cell)"),
    "f": ("differencing published aggregates",
          "difference every pair of published cells (successive windows, versions, nested "
          "windows), with and without its own contribution, and look for any single "
          "competitor's value in the residues"),
}


#: What the suite does not attack, rendered under the table.
LIMITS = (
    "- Outside knowledge: windows, categories and presence are published by design; a",
    "  member who knows, say, which retailer opens an hour early can match that pseudonym's",
    "  first window. Attack d counts the presence it can read but joins it to nothing",
    "  outside the wire.",
    "- Price bounds from aggregates: a price mean and standard deviation over a cell in which",
    "  each company reports once would bound each company's price. `make up`'s bridge",
    "  publishes daily cells, so none exists here; attack b reads per-insight fields only.",
    "- Collusion: one member attacks. Members pooling their own values could difference a",
    "  cell down to fewer companies than k.",
    "- Traffic analysis: message sizes and arrival times are not measured.",
)


def results_path() -> Path:
    return Path(os.environ.get("PEAR_PRIVACY_RESULTS", DEFAULT_RESULTS))


def record(*, attack: str, policy: str, levels: Mapping[str, str], learned: str, bound: str,
           held: bool, metrics: Mapping[str, Any] | None = None, order: int = 0) -> None:
    """Append what ``attack`` learned under ``policy`` (``levels``: its effective sharing
    levels; ``order``: the policy's place in the report)."""
    row = {"attack": attack, "policy": policy, "levels": dict(levels), "learned": learned,
           "bound": bound, "held": held, "metrics": dict(metrics or {}), "order": order,
           "at": time.time()}
    path = results_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(row, sort_keys=True, default=str) + "\n")


def load(path: Path) -> list[dict[str, Any]]:
    """The last row per (attack, policy): a rerun replaces the earlier figures."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                rows[(row["attack"], row["policy"])] = row
    return list(rows.values())


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(rows: Iterable[dict[str, Any]]) -> str:
    rows = sorted(rows, key=lambda r: (r["attack"], r.get("order", 0), r["policy"]))
    policies: dict[str, dict[str, Any]] = {}
    for r in sorted(rows, key=lambda r: r.get("order", 0)):
        policies.setdefault(r["policy"], r)
    held = sum(1 for r in rows if r["held"])
    out = [
        "# Privacy: what a member can learn, attacked and counted",
        "",
        "Generated by `make privacy` (the same tests run in `make test`); do not edit by hand.",
        "Every row is a test in `tests/integration/privacy/` that plays one consortium member",
        "(or public participant) of the `make up` topology with nothing but its own node",
        "configuration, as `pear-mqtt up` writes it, and everything its certificates let it",
        "read from the real brokers over a simulated market: six companies, four categories,",
        "twelve hours across two daily windows, prices on a random walk, sales with known",
        "transaction counts, one company opening an hour earlier. The bridge runs from",
        "`make up`'s own configuration on a test clock. Each test asserts the bound in its",
        "row and fails when a default lets the attack learn more.",
        "",
        "The attacker is the consortium's sixth company with the node configuration `make up`",
        "wrote for it and its public-network certificate (in the public policy: a public",
        "participant with nothing but its participant configuration; in the private policy,",
        "a competitor of the company whose two stores share everything on their private",
        "network, holding only its own credentials). It reads everything",
        "its certificates let it read (live, and as a late joiner), re-sends and replays,",
        "and opens what it read with its own keys. The ground truth only scores what an",
        "attack derived. Power tests (`test_attack_power.py`) show every attack noticing a",
        "leak built into a capture, so a held row is not a blind one.",
        "",
        f"{held} of {len(rows)} rows hold.",
        "",
        "## Policies",
        "",
        "| policy | price_data | sales_data | trends |",
        "|---|---|---|---|",
    ]
    for name, r in policies.items():
        lv = r.get("levels", {})
        out.append(f"| {_cell(name)} | {lv.get('price_data', '-')} | "
                   f"{lv.get('sales_data', '-')} | {lv.get('trends', '-')} |")
    out += ["", "## Attacks", ""]
    for key, (title, how) in ATTACKS.items():
        out.append(f"- **{key}. {title}**: {how}.")
    out += ["", "## Results", "",
            "| attack | policy | what it learns | allowed bound | held |",
            "|---|---|---|---|---|"]
    for r in rows:
        title = ATTACKS.get(r["attack"], (r["attack"], ""))[0]
        out.append(f"| {r['attack']}. {_cell(title)} | {_cell(r['policy'])} | "
                   f"{_cell(r['learned'])} | {_cell(r['bound'])} | "
                   f"{'held' if r['held'] else '**not held**'} |")
    out += ["", "## Not covered", "", *LIMITS, ""]
    return "\n".join(out)


def main(argv: list[str]) -> int:
    src = Path(argv[1]) if len(argv) > 1 else results_path()
    dst = Path(argv[2]) if len(argv) > 2 else DEFAULT_DOC
    rows = load(src)
    if not rows:
        print(f"no privacy results in {src}: run `make privacy` first", file=sys.stderr)
        return 1
    dst.write_text(render(rows), encoding="utf-8")
    print(f"{len(rows)} rows -> {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
