"""One writer per output of a run, each knowing only its own medium.

console.py: the printed lines and the tqdm bars; log_file.py: train.log; jsonl.py: metrics.jsonl;
summary_file.py: summary.json; wandb_writer.py: the wandb run and its do-nothing stand-in. The tracker
builds every record and line and hands it to the writers it was given.
"""
