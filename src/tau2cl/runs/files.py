"""The names of a run's files in its log_dir: one place, read by the writer and every reader."""

METRICS_FILE = "metrics.jsonl"  # one JSON record per line: train, eval, transfer
SUMMARY_FILE = "summary.json"  # task order, accuracy matrices, final measures, config used
LOG_FILE = "train.log"  # every console line, and the compact train lines under the bar
EVAL_RESULTS_DIR = "eval_results"  # tau2 Results files of every evaluation
MATRIX_PNG = "accuracy_matrix.png"  # the report's heatmap
CURVES_PNG = "learning_curves.png"  # the report's reward curves
REPORT_TXT = "report.txt"  # the report's text
CHECKPOINT_PREFIX = "checkpoint_"  # checkpoint_task_{i}, checkpoint_step_{n}
LOCK_FILE = ".tau2cl.lock"  # held (flock) by the run writing into the folder

# What a run writes into its log_dir: a folder holding any of these holds a run.
RUN_FILES = (METRICS_FILE, SUMMARY_FILE, LOG_FILE, EVAL_RESULTS_DIR, MATRIX_PNG, CURVES_PNG, REPORT_TXT)
