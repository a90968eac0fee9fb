"""Rank-0 reporting of a run: tqdm bar, compact lines, metrics.jsonl, summary.json, train.log, wandb.

The lines themselves come from the pure formatters in formats.py; the tracker decides when and
where to write them. Only the main process writes; on every other rank each method is a no-op.
"""

from __future__ import annotations

import functools
import json
import numbers
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from tqdm import tqdm

from tau2cl.errors import UserError
from tau2cl.evaluation.stats import EvalSummary
from tau2cl.reporting.formats import (
    BAR_FORMAT,
    EVAL_BAR_FORMAT,
    format_banner,
    format_domain_rows,
    format_eval_detail,
    format_eval_line,
    format_final_summary,
    format_initial_block,
    format_initial_header,
    format_postfix,
    format_sft_line,
    format_train_detail,
    format_train_line,
    format_transfer_block,
)
from tau2cl.runs.files import LOG_FILE, METRICS_FILE, SUMMARY_FILE

# ---------------------------------------------------------------- the tracker


class _NoWandb:
    """Do-nothing stand-in for a wandb run (wandb off, or not rank 0), so callers never branch."""

    id = None

    def __init__(self) -> None:
        self.summary: dict[str, Any] = {}

    def log(self, data: dict, step: int | None = None) -> None:
        pass

    def finish(self) -> None:
        pass


def _init_wandb(project: str, name: str | None, run_id: str | None, config: dict, log_dir: str):
    try:
        import wandb  # imported here: no import cost when wandb is off
    except ImportError as error:
        raise UserError(
            "wandb_project is set but wandb is not installed; pip install wandb or unset it."
        ) from error
    # resume="allow": a resumed run passes its old id and continues the same wandb run.
    return wandb.init(
        project=project, name=name, id=run_id, resume="allow", config=config, dir=log_dir
    )


def _numbers(prefix: str, figures: Mapping[str, Any]) -> dict[str, float]:
    """The numeric figures under a wandb namespace ("train/loss"); None and text are left out."""
    return {f"{prefix}/{k}": v for k, v in figures.items() if isinstance(v, numbers.Real)}


def _to_json(value: Any) -> Any:
    """json default: numpy scalars and 0-d tensors become Python numbers, arrays lists."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _main_only(method):
    """Run the method on the main process only; elsewhere it does nothing and returns None."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if not self.is_main:
            return None
        return method(self, *args, **kwargs)

    return wrapper


class MetricsTracker:
    """Console, files and wandb of one run. Only the main process reports; elsewhere all no-ops.

    `step` is the number of steps done in the current domain (1..num_steps); `global_step` counts
    steps over the whole run and is the monotone wandb step.
    """

    def __init__(
        self,
        log_dir: str,
        config_dict: dict,
        *,
        is_main: bool = True,
        use_progress_bar: bool = True,
        log_interval: int = 10,
        verbose: bool = False,
        wandb_project: str | None = None,
        wandb_run_name: str | None = None,
        wandb_run_id: str | None = None,
        stream: TextIO | None = None,
    ) -> None:
        self.is_main = is_main
        self.log_dir = log_dir
        self.use_progress_bar = use_progress_bar
        self.log_interval = max(1, log_interval)
        self.verbose = verbose
        self._stream = stream if stream is not None else sys.stdout
        self._bar: tqdm | None = None
        self._eval_bar: tqdm | None = None
        self._domain, self._num_steps, self._step = None, None, 0
        self._initial_announced = False  # the row-0 header is out; its rows follow alone
        self._last_kind: str | None = None  # what was printed last; decides blank separator lines
        self._jsonl = None
        self._log = None
        self._wandb: Any = _NoWandb()
        self._wandb_run_id: str | None = None
        if not is_main:
            return
        os.makedirs(log_dir, exist_ok=True)
        # Line-buffered append: a crash loses no finished line, a resumed run adds to the file.
        self._jsonl = open(
            os.path.join(log_dir, METRICS_FILE), "a", buffering=1, encoding="utf-8"
        )
        # Every console line (and the compact train lines, even under the bar) also goes here.
        self._log = open(os.path.join(log_dir, LOG_FILE), "a", buffering=1, encoding="utf-8")
        if wandb_project:
            self._wandb = _init_wandb(
                wandb_project, wandb_run_name, wandb_run_id, config_dict, log_dir
            )
            self._wandb_run_id = self._wandb.id

    @classmethod
    def from_config(cls, config, *, is_main: bool, wandb_run_id: str | None = None, stream=None):
        """Build from a GRPOConfig (its logging fields and to_dict())."""
        return cls(
            config.log_dir,
            config.to_dict(),
            is_main=is_main,
            use_progress_bar=config.use_progress_bar,
            log_interval=config.log_interval,
            verbose=config.verbose,
            wandb_project=config.wandb_project,
            wandb_run_name=config.wandb_run_name,
            wandb_run_id=wandb_run_id,
            stream=stream,
        )

    @property
    def wandb_run_id(self) -> str | None:
        """The wandb run's id (keep it in the checkpoint to resume the same run); else None."""
        return self._wandb_run_id

    # ------------------------------------------------------------ output plumbing

    def _write(self, text: str, kind: str) -> None:
        """Print through tqdm.write, which lifts the bar, prints, and redraws it below.

        Blocks ("block") and the first [EVAL] line after other output get a blank line above them.
        """
        if self._last_kind is not None and (
            kind == "block" or (kind == "eval" and self._last_kind != "eval")
        ):
            text = "\n" + text
        tqdm.write(text, file=self._stream)
        self._stream.flush()
        self._to_log(text)
        self._last_kind = kind

    def _to_log(self, text: str) -> None:
        if self._log is not None:
            self._log.write(text + "\n")

    def _record(self, header: dict, figures: Mapping[str, Any]) -> None:
        """Append one metrics.jsonl line: header keys first (they win a clash), then figures."""
        record = {**header, "time": time.time()}
        record.update((k, v) for k, v in figures.items() if k not in record)
        self._jsonl.write(json.dumps(record, default=_to_json) + "\n")

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()  # leave=True: the finished bar stays on screen
            self._bar = None
            self._last_kind = "bar"

    # ------------------------------------------------------------ the trainer's calls

    @_main_only
    def start_domain(
        self, task_idx: int, domain: str, num_train_tasks: int, num_steps: int, start_step: int = 0
    ) -> None:
        self._close_bar()
        self._domain, self._num_steps, self._step = domain, num_steps, start_step
        self._write(format_banner(task_idx, domain, num_train_tasks), "block")
        if self.use_progress_bar:
            self._bar = tqdm(
                total=num_steps,
                initial=start_step,
                desc=f"Task {task_idx} ({domain})",
                file=self._stream,
                bar_format=BAR_FORMAT,
                dynamic_ncols=True,
                mininterval=0.1,  # a step takes seconds: redraw on every one
                miniters=1,
                leave=True,
            )

    @_main_only
    def log_train(
        self, task_idx: int, domain: str, step: int, global_step: int, stats: Mapping[str, Any]
    ) -> None:
        self._step = step
        header = {
            "type": "train",
            "task_idx": task_idx,
            "domain": domain,
            "step": step,
            "global_step": global_step,
        }
        self._record(header, stats)
        self._wandb.log(_numbers("train", stats), step=global_step)
        if self._bar is not None:
            self._bar.set_postfix_str(format_postfix(stats), refresh=False)
            self._bar.update(1)
            if self._bar.total is not None and self._bar.n >= self._bar.total:
                self._close_bar()  # so the domain's last [EVAL] prints below a finished bar
            if not self.verbose:  # the bar shows loss, reward and kl; the log file gets the line
                if step % self.log_interval == 0 or step == self._num_steps:
                    self._to_log(format_train_line(task_idx, step, self._num_steps, stats))
                return
        if step % self.log_interval == 0 or step == self._num_steps:
            self._write(format_train_line(task_idx, step, self._num_steps, stats), "train")
            if self.verbose:
                self._write(format_train_detail(stats), "train")

    @_main_only
    def log_sft(
        self, task_idx: int, domain: str, step: int, num_steps: int, global_step: int, stats: Mapping[str, Any]
    ) -> None:
        """A supervised warm-start step: its own record type; a line every log_interval steps."""
        header = {"type": "sft", "task_idx": task_idx, "domain": domain, "step": step, "global_step": global_step}
        self._record(header, stats)
        self._wandb.log(_numbers("sft", stats), step=global_step)
        if step % self.log_interval == 0 or step == num_steps:
            self._write(format_sft_line(task_idx, step, num_steps, stats), "train")

    @_main_only
    def log_eval(
        self,
        task_idx: int,
        step: int,
        global_step: int,
        summary: EvalSummary,
        current_domain: str,
        *,
        echo: bool = True,
        stage: int | None = None,
    ) -> None:
        """Record an evaluation; `echo` prints the [EVAL] line; `stage` = its accuracy-matrix row."""
        self._step = step
        if echo:
            self._write(format_eval_line(task_idx, step, summary, current_domain), "eval")
            if self.verbose:
                self._write(format_eval_detail(summary), "eval")
        figures = summary.to_dict()
        del figures["domain"]
        figures["pass_hat_k"] = {str(k): v for k, v in summary.pass_hat_k.items()}
        header = {
            "type": "eval",
            "task_idx": task_idx,
            "domain": current_domain,
            "eval_domain": summary.domain,
            "step": step,
            "global_step": global_step,
            "stage": stage,
        }
        self._record(header, figures)
        wandb_figures = {**figures, **{f"pass_hat_{k}": v for k, v in summary.pass_hat_k.items()}}
        self._wandb.log(_numbers(f"eval/{summary.domain}", wandb_figures), step=global_step)

    @_main_only
    def announce_initial_eval(self) -> None:
        """The header of the evaluation before training, before that evaluation runs."""
        self._write(format_initial_header(), "block")
        self._initial_announced = True

    @_main_only
    def log_initial_eval(self, global_step: int, summaries: Mapping[str, EvalSummary]) -> None:
        """Row 0: print every domain's scores before training (under its header) and record them."""
        rows = "\n".join(format_domain_rows(summaries, None))
        self._write(rows if self._initial_announced else format_initial_block(summaries), "block")
        first = next(iter(summaries))
        for summary in summaries.values():
            self.log_eval(0, 0, global_step, summary, first, echo=False, stage=0)

    @_main_only
    def log_strategy(
        self, strategy: str, task_idx: int, domain: str, global_step: int, figures: Mapping[str, Any], line: str
    ) -> None:
        """A strategy's own record (e.g. the α a search chose) and its console line."""
        header = {
            "type": "strategy",
            "strategy": strategy,
            "task_idx": task_idx,
            "domain": domain,
            "step": self._step,
            "global_step": global_step,
        }
        self._record(header, figures)
        self._wandb.log(_numbers(f"strategy/{strategy}", figures), step=global_step)
        self._write(line, "message")

    @_main_only
    def end_domain(self) -> None:
        self._close_bar()

    @_main_only
    def log_transfer(
        self,
        task_idx: int,
        global_step: int,
        summaries: Mapping[str, EvalSummary],
        seen: Sequence[str],
        measures: Mapping[str, float | None],
    ) -> None:
        self._close_bar()
        self._write(format_transfer_block(task_idx, summaries, seen, measures), "block")
        domain = self._domain if self._domain is not None else (seen[-1] if seen else None)
        header = {
            "type": "transfer",
            "task_idx": task_idx,
            "domain": domain,
            "step": self._step,
            "global_step": global_step,
        }
        scores = {name: s.reward_mean for name, s in summaries.items()}
        self._record(header, {**measures, "seen": list(seen), "scores": scores})
        per_domain = {f"{name}/reward_mean": v for name, v in scores.items()}
        self._wandb.log(_numbers("transfer", {**measures, **per_domain}), step=global_step)

    @_main_only
    def log_final_summary(
        self,
        domains: Sequence[str],
        matrix: Sequence[Sequence[float | None]],
        measures: Mapping[str, float | None],
        split: str = "test",
        floor: Mapping[str, float] | None = None,
    ) -> None:
        self._close_bar()
        self._write(format_final_summary(domains, matrix, measures, split, floor), "block")
        self._wandb.summary.update(_numbers("final", measures))

    @_main_only
    def write_summary(self, summary: dict) -> None:
        """Write log_dir/summary.json atomically, so a reader never sees half a file."""
        path = os.path.join(self.log_dir, SUMMARY_FILE)
        tmp_path = f"{path}.tmp"
        with open(tmp_path, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2, default=_to_json)
            f.write("\n")
        os.replace(tmp_path, path)

    @_main_only
    def eval_progress(self, label: str, domain: str, done: int, total: int) -> None:
        """An evaluation's episodes as they finish: a bar, or one compact line per batch.

        Called with done=0 before the first episode (so its header comes before the work) and after
        every batch; the bar closes itself when done reaches total.
        """
        desc = f"Eval {domain} ({label})"
        if not self.use_progress_bar:
            self._write(f"[EVAL] {domain} ({label}): {done}/{total} episodes", "progress")
            return
        if done == 0 or self._eval_bar is None:
            self._close_eval_bar()
            self._eval_bar = tqdm(
                total=total, desc=desc, file=self._stream, bar_format=EVAL_BAR_FORMAT,
                dynamic_ncols=True, mininterval=0, miniters=1, leave=False,  # a batch takes seconds
            )
        self._eval_bar.update(done - self._eval_bar.n)
        if done >= total:
            self._close_eval_bar()

    def _close_eval_bar(self) -> None:
        if self._eval_bar is not None:
            self._eval_bar.close()  # leave=False: the [EVAL] line that follows stays instead
            self._eval_bar = None

    @_main_only
    def log_message(self, text: str) -> None:
        """Any other line from the trainer, printed without garbling the bar."""
        self._write(text, "message")

    @_main_only
    def close(self) -> None:
        """Close the bars, the metrics file and the wandb run; safe to call twice."""
        self._close_eval_bar()
        self._close_bar()
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._log is not None:
            self._log.close()
            self._log = None
        self._wandb.finish()
        self._wandb = _NoWandb()

    def __enter__(self) -> MetricsTracker:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
