"""
What the experiments share: one resumable store of finished runs, one rule for each arch's best point,
and one rule for what the seeds allow us to say about the archs' order.
"""
import json
import os
import statistics
from pathlib import Path


class ResultStore:
    """results.jsonl in a folder: every finished run, one line each, keyed by all that sets its result.
    A run found there is read back, not run again, so an interrupted experiment continues where it stopped.
    Each line is written whole and synced to disk; a line cut off by a kill while it was written is
    reported, left where it is, and its run done again."""

    def __init__(self, folder):
        self.path = Path(folder) / "results.jsonl"
        self.done, cut_off = [], 0
        for line in self.path.read_text().splitlines() if self.path.exists() else []:
            try:
                self.done.append(json.loads(line))
            except json.JSONDecodeError:
                cut_off += 1
        if cut_off:
            print(f"{self.path}: {cut_off} line(s) cut off by an interrupted write (left as they are): "
                  "their runs are done again", flush=True)

    def get(self, key, compute):
        """(the run of key, whether it was read back): compute() makes it and it is stored when missing."""
        found = next((r for r in self.done if all(r.get(k) == v for k, v in key.items())), None)
        if found is not None:
            return found, True
        found = {**key, **compute()}
        self.append(found)
        return found, False

    def append(self, row):
        """One line, whole: a single write in append mode (after a newline if a cut-off line ends the
        file), then synced, so a kill leaves every earlier row intact."""
        line = json.dumps(row) + "\n"
        with open(self.path, "ab+") as f:  # writes go to the end whatever the position
            end = f.seek(0, os.SEEK_END)
            if end and f.seek(end - 1) is not None and f.read(1) != b"\n":
                line = "\n" + line
            f.write(line.encode())
            f.flush()
            os.fsync(f.fileno())
        self.done.append(row)


def best_of(results, group, score, higher_is_better=False):
    """{group(r): the result r with the best score(r)} (the lowest, unless higher_is_better): each arch's
    best point, chosen on selection or validation runs only."""
    best = {}
    for r in results:
        key = group(r)
        if key not in best or (score(r) > score(best[key]) if higher_is_better else score(r) < score(best[key])):
            best[key] = r
    return best


def ranking(by_arch, higher_is_better=False, fmt=".3f", unit=""):
    """What the seeds allow us to say about the archs' order ({arch: [value per seed]}, a loss unless
    higher_is_better), one sentence per neighbouring pair: a ranking only where every seed of one arch
    ends beyond every seed of the other."""
    if len(by_arch) < 2:
        return ["One arch only: nothing to rank."]
    if all(len(v) == 1 for v in by_arch.values()):
        return ["One seed per arch: no spread was measured, so no ranking is claimed (use --seeds 2 or more)."]
    order = sorted(by_arch, key=lambda a: statistics.mean(by_arch[a]), reverse=higher_is_better)
    sign, side = (">", "above") if higher_is_better else ("<", "below")
    lines = []
    for better, worse in zip(order, order[1:]):
        gap = format(abs(statistics.mean(by_arch[worse]) - statistics.mean(by_arch[better])), fmt) + unit
        apart = min(by_arch[better]) > max(by_arch[worse]) if higher_is_better else max(by_arch[better]) < min(by_arch[worse])
        if apart:
            lines.append(f"{better} {sign} {worse} by {gap}: every seed of {better} ends {side} every seed of {worse}.")
        else:
            lines.append(f"{better} vs {worse}: {gap} apart, within the spread between seeds: no ranking.")
    return lines


