"""What a run shows and writes: line formats (pure), the tracker (bar, lines, files, wandb), reading runs back, report and plots."""
