"""What people watch during training: metrics.jsonl, TensorBoard events and a loss-curve PNG."""

from __future__ import annotations

import json
import os
from pathlib import Path

from havoc_core.tokenizer.corpus import jsonl_records

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


class MetricsLog:
    """Appends records to metrics.jsonl and TensorBoard; on rank 0 only (`enabled`).

    A resumed run first drops the records after the step it resumed from, so the curve has no
    duplicate steps from the interrupted run.
    """

    def __init__(self, out: Path, enabled: bool, keep_until_step: int):
        self.enabled = enabled
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        out.mkdir(parents=True, exist_ok=True)
        self.path, self.plot_path = out / METRICS_FILE, out / PLOT_FILE
        kept = [r for r in read_metrics(self.path) if r["step"] <= keep_until_step] if self.path.exists() else []
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.file = open(self.path, "a")
        self.tensorboard = SummaryWriter(str(out / "tensorboard"), purge_step=keep_until_step + 1)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for key, value in record.items():
            if key != "step":
                self.tensorboard.add_scalar(key, value, record["step"])

    def plot(self) -> None:
        """Redraw loss.png from metrics.jsonl (written beside it, then renamed into place)."""
        if not self.enabled:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = read_metrics(self.path)
        fig, ax = plt.subplots(figsize=(7, 4))
        for key, style in (("loss", "-"), ("val_loss", "o-")):
            points = [(r["step"], r[key]) for r in records if key in r]
            if points:
                ax.plot(*zip(*points), style, label=key.replace("_", " "))
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        tmp = self.plot_path.with_name(f".{PLOT_FILE}.tmp.png")
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
        plt.close(fig)
        os.replace(tmp, self.plot_path)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tensorboard.close()


def read_metrics(path: Path) -> list[dict]:
    """The records of metrics.jsonl: an append log, so a torn last line is dropped with a warning."""
    return [record for _, record in jsonl_records(path, Path(path).read_text().splitlines(), torn_end=True)]
