"""Experiment tracking: `--report-to tensorboard,wandb,mlflow`, each through its own library.

Rank 0 alone tracks (the other ranks' Trackers stay empty); trackers start once the input has
passed, with the files of the run (nothing is written for a run stopped by bad input). Sent:
- at the start, the run's options (cfg.to_dict(), secrets redacted as in every file the run
  writes: distill/export.py's `redact`);
- every --logging-steps, train/loss, train/ce, train/kl, train/lr, train/grad_norm (what
  DeepSpeed's engine reports; absent where it computes none), train/tokens_per_s (and
  train/hidden, train/batches/* when those are on); every eval, eval/loss, eval/ce, eval/kl;
- at the end, the final eval, final/* (train seconds, tokens/s, samples and tokens seen) and the
  report's figures, report/* (speedups, quality kept, each model's scores, speed and size).
Where each library keeps them:
- tensorboard: event files in OUTPUT_DIR/tensorboard/<start time> (torch.utils.tensorboard's
  SummaryWriter, which needs the `tensorboard` package).
- wandb: wandb.init(project=$WANDB_PROJECT or "seq2seq-distill", dir=$WANDB_DIR or OUTPUT_DIR);
  WANDB_MODE=offline keeps the run in DIR/wandb/offline-run-* for a later `wandb sync`. wandb's
  console capture is off: the run's lines stay ours (distill/run_log.py).
- mlflow: $MLFLOW_TRACKING_URI, else a local file store, OUTPUT_DIR/mlruns; experiment
  $MLFLOW_EXPERIMENT_NAME or "seq2seq-distill". Through MlflowClient, so no global mlflow state
  (active run, tracking URI) is touched. MLflow 3 keeps its file store behind
  MLFLOW_ALLOW_FILE_STORE; it is set (unless already set) when the store is a folder.
A tracker that cannot start (package missing, init failure) or fails later is dropped with one
warning line; training goes on and the run's files (metrics.json, train.log) have everything.
"""
from __future__ import annotations

import math
import os
import time

from distill.errors import UserError
from distill.export import redact
from distill.run_log import logger

NAMES = ("tensorboard", "wandb", "mlflow")
PROJECT = "seq2seq-distill"  # W&B project and MLflow experiment unless the environment names one
INSTALL = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow-skinny"}
# metrics.json's totals sent at the end, as final/<name>
FINAL = ("steps", "samples_seen", "tokens_seen", "bad_steps", "train_seconds", "train_tokens_per_s")


def parse_report_to(value) -> list[str]:
    """--report-to (a comma list, or a list from a --config file) -> tracker names; [] for none."""
    items = value if isinstance(value, (list, tuple)) else str(value or "none").split(",")
    names = [str(item).strip().lower() for item in items if str(item).strip()]
    unknown = [n for n in names if n not in NAMES + ("none",)]
    if unknown:
        raise UserError(f"--report-to {','.join(map(str, items))}: unknown tracker {unknown[0]!r}; use none or a "
                        f"comma list of {', '.join(NAMES)}")
    return list(dict.fromkeys(n for n in names if n != "none"))


def flatten(figures: dict, prefix: str | None = None) -> dict[str, float]:
    """A history entry or a metrics dict -> {"train/loss": 1.2, "eval/loss": ...}: eval_* keys go
    under eval/, the rest under `prefix` (train/ by default); dicts nest; non-numbers are left out."""
    out = {}
    for key, value in figures.items():
        if key == "step" or value is None or isinstance(value, bool):
            continue
        if prefix is None and key.startswith("eval_"):
            name = "eval/" + key[len("eval_"):]
        else:
            name = f"{prefix or 'train'}/{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name))
        elif isinstance(value, (int, float)) and math.isfinite(value):
            out[name] = float(value)
    return out


def report_figures(report: dict | None) -> dict[str, float]:
    """The report's headline figures and each model's (by role: teacher, student) as report/*."""
    if not report:
        return {}
    figures = {k: report.get(k) for k in ("speedup_b1", "speedup_b32", "quality_retention")}
    for name, model in report.get("models", {}).items():
        figures[model.get("role", name)] = model
    return flatten(figures, "report")


class Tracker:
    """One tracking library: the run's options once, scalars by step, close at the end."""

    name = ""

    def options(self, options: dict) -> None:
        raise NotImplementedError

    def scalars(self, figures: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def close(self, ok: bool) -> None:
        raise NotImplementedError


class TensorBoard(Tracker):
    name = "tensorboard"

    def __init__(self, output_dir: str, run_name: str):
        from torch.utils.tensorboard import SummaryWriter

        self.dir = os.path.join(output_dir, "tensorboard", time.strftime("%Y%m%d-%H%M%S"))
        self.writer = SummaryWriter(log_dir=self.dir)
        self.where = f"tensorboard: event files in {self.dir} (tensorboard --logdir {os.path.dirname(self.dir)})"

    def options(self, options):
        import json

        # TensorBoard's text plugin renders markdown: a code block keeps the JSON as it is.
        self.writer.add_text("options", "```\n" + json.dumps(options, indent=2, default=str) + "\n```")

    def scalars(self, figures, step):
        for name, value in figures.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()  # a TensorBoard watching the run sees each logging step, not every 2 min

    def close(self, ok):
        self.writer.close()


class WandB(Tracker):
    name = "wandb"

    def __init__(self, output_dir: str, run_name: str):
        import wandb

        # console="off": wandb would otherwise wrap sys.stdout/stderr. x_disable_meta: its metadata
        # holds the command line (sys.argv), unredacted; the options it gets here are redacted.
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or PROJECT, name=run_name,
                              dir=os.environ.get("WANDB_DIR") or output_dir,
                              settings=wandb.Settings(console="off", silent=True, x_disable_meta=True))
        offline = self.run.settings.mode in ("offline", "dryrun")
        self.where = (f"wandb: offline run in {self.run.settings.sync_dir} (wandb sync uploads it)" if offline
                      else f"wandb: {self.run.url}")

    def options(self, options):
        self.run.config.update(options, allow_val_change=True)

    def scalars(self, figures, step):
        self.run.log(figures, step=step)

    def close(self, ok):
        self.run.finish(exit_code=0 if ok else 1)


class MLflow(Tracker):
    name = "mlflow"

    def __init__(self, output_dir: str, run_name: str):
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or "file:" + os.path.abspath(os.path.join(output_dir, "mlruns"))
        if "://" not in uri or uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or PROJECT
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        self.where = f"mlflow: run {self.run_id} in experiment {name!r} at {uri}"

    def options(self, options):
        from mlflow.entities import Param

        # MLflow params are strings of at most 6000 characters, at most 100 per batch.
        params = [Param(k, str(v)[:6000]) for k, v in options.items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def scalars(self, figures, step):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in figures.items()])

    def close(self, ok):
        self.client.set_terminated(self.run_id, status="FINISHED" if ok else "FAILED")


ADAPTERS = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}


def _warn(name: str, what: str, exc: Exception) -> None:
    if isinstance(exc, ImportError):
        reason = (f"the {INSTALL[name]} package is not installed (pip install {INSTALL[name]}, or "
                  f"pip install 'seq2seq-distill[tracking]')")
    else:
        reason = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"
        reason = redact(reason)
    logger().warning(f"warning: --report-to {name}: {what} ({reason}); the run goes on without it")


class Trackers:
    """The run's trackers; a no-op until start() (and on every rank but 0)."""

    def __init__(self):
        self.active: list[Tracker] = []

    def start(self, cfg) -> None:
        """Start each tracker cfg.report_to names and send it the run's options."""
        run_name = os.path.basename(os.path.abspath(cfg.output_dir))
        options = redact(cfg.to_dict())
        for name in parse_report_to(cfg.report_to):
            try:
                tracker = ADAPTERS[name](cfg.output_dir, run_name)
            except Exception as exc:  # any failure of a tracker's library must not end the run
                _warn(name, "could not start", exc)
                continue
            self.active.append(tracker)
            logger().info(redact(tracker.where))  # a tracking URI may hold user:password@
            self._call(tracker, "options", options)

    def log(self, figures: dict, step: int, prefix: str | None = None) -> None:
        """A history entry, eval or final figures (see flatten) at optimizer step `step`."""
        self._scalars(flatten(figures, prefix), step)

    def report(self, report: dict | None, step: int) -> None:
        """The final report's figures (report_figures), at the last step."""
        self._scalars(report_figures(report), step)

    def _scalars(self, scalars: dict[str, float], step: int) -> None:
        if scalars:
            for tracker in list(self.active):
                self._call(tracker, "scalars", scalars, step)

    def final(self, metrics: dict, step: int) -> None:
        """The end of training: the final eval (eval/*) and the run's totals (final/*)."""
        self.log(metrics.get("final_eval") or {}, step)
        self.log({k: metrics.get(k) for k in FINAL}, step, prefix="final")

    def close(self, ok: bool = True) -> None:
        for tracker in self.active:
            try:
                tracker.close(ok)
            except Exception as exc:
                _warn(tracker.name, "could not close", exc)
        self.active = []

    def _call(self, tracker: Tracker, method: str, *args) -> None:
        try:
            getattr(tracker, method)(*args)
        except Exception as exc:
            _warn(tracker.name, f"{method} failed", exc)
            self.active.remove(tracker)
            try:
                tracker.close(False)
            except Exception:
                pass  # it already failed; its warning is out
