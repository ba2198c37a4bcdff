"""The Flash-VStream model: the one-file VLM, its prompts, the splice of a memory into a prompt, the answer paths
(eager, fast, batched across streams) and loading and saving checkpoints.

It owns weights and arithmetic; it runs no engine, serves nothing and reads no stream (see `vstream.engine`).
"""
