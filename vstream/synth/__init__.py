"""Synthetic video: test clips (`clips`) and the procedural streaming world with questions (`world`)."""

from vstream.synth.world import (
    BACKGROUNDS,
    OBJECT_COLOURS,
    QA,
    QUESTION_TYPES,
    SHAPES,
    SPLIT_SEEDS,
    Event,
    Scene,
    Stream,
    generate_stream,
    label_map,
    make_questions,
    render,
    split_seeds,
    write_dataset,
    write_stream_video,
)

__all__ = [
    "BACKGROUNDS", "OBJECT_COLOURS", "QA", "QUESTION_TYPES", "SHAPES", "SPLIT_SEEDS", "Event", "Scene", "Stream",
    "generate_stream", "label_map", "make_questions", "render", "split_seeds", "write_dataset", "write_stream_video",
]
