"""The names of a run's files in its log_dir: one place, read by the writer and every reader."""

METRICS_FILE = "metrics.jsonl"  # one JSON record per line: train, eval, transfer
SUMMARY_FILE = "summary.json"  # task order, accuracy matrices, final measures, config used
LOG_FILE = "train.log"  # every console line, and the compact train lines under the bar
