"""Evaluation: pre-extracted features, benchmark loaders, offline and streaming runs, judges and reports.

`features` writes and reads feature files; `datasets` reads benchmarks in their published formats and validates every
record; `runner` produces predictions (offline: each question from the video up to its time; streaming: one pass per
video through the stream session); `judges` scores them; `report` writes results, Markdown tables and plots;
`jsonl` reads and appends the resumable per-run files; `scoring` normalises answers and counts accuracy per type;
`world` is the procedural world's accuracy per question type with memory parts switched off.
"""
