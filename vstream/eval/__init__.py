"""Evaluation: pre-extracted features, benchmark loaders, offline and streaming runs, judges and reports.

`features` writes and reads feature files; `datasets` reads benchmarks in their published formats and validates every
record; `play` is the one loop that plays a video and answers its questions along it, under no clock (offline),
simulated time or the wall clock (live); `runner` produces resumable predictions with it; `judges` scores them;
`report` writes results, Markdown tables and plots; `jsonl` reads and appends the resumable per-run files;
`scoring` normalises answers and counts accuracy per type;
`world` is the procedural world's accuracy per question type with memory parts switched off.
"""
